"""The ground every other package stands on: what a run is made of, with no engine behind it.

Errors (`UserError`), crash-safe file writes (`files`), the configuration declared once (`config`), tasks and
their splits (`data`), prompts and answer extraction (`prompts`), the pure cores of the method (`selection`,
`retrieval`, `collapse`), the run folder with its sealed stages and digests (`runfolder`), the API key
(`apikey`), and the GGUF formats read and written without an engine (`gguf_file`, `adapter_gguf`).

These modules import only each other and third-party libraries (NumPy, gguf-py, jinja2): never MLX,
llama.cpp, or another package of semievol_local.
"""
