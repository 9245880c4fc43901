"""SemiEvol itself, and what a run needs around it: the recipe (`pipeline`) and its stages (`stages`), from
fine-tunes (`finetune`) and evaluation (`evaluate`) to collaboration (`collaboration`); prediction on new rows
(`predict`); the run's work and time known before it starts (`workload`, `estimate`); its report
(`report`); the models it runs on (`models`); the demo task (`demo_task`, with its data); and export to
other tools (`export`, with `merge`: the adapter merged into its base GGUF).

This package may import `core`, `engines` and `training`; nothing here draws on the terminal (the
pipeline calls a reporter that `cli.ui` supplies).
"""
