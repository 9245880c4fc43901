"""What a finished run produced, in the formats other tools read.

- `training_rows`: labeled + selected pseudo-labeled rows in the task format (question, options, answer) with
  where each came from (`source`, `round`, `entropy`): the set the last final fine-tune trained on, in its order.
- `chat_record`: one row as mlx-lm's chat data (`{"messages": [...]}`), the prompt and target our trainer uses.
- `ollama_template` / `modelfile`: an Ollama Modelfile that serves the base GGUF with the run's adapter, its
  prompt template derived from the GGUF's own chat template (rendered, not hand-written per model family).
- `export_run` writes all of it into a new folder, whole or not at all.

The unlabeled split is read without its answers: a pseudo-labeled row's answer is its pseudo-label.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from ..core.data import Item, find_split_file, head, load_split
from ..core.errors import UserError
from ..core.files import atomic_folder, atomic_write_json, atomic_write_text
from ..core.prompts import ChatTemplate, answer_text, question_messages
from ..core.runfolder import run_record

COLUMNS = ("question", "options", "answer", "source", "round", "entropy", "source_index")


# --- reading a run ----------------------------------------------------------------------------------

def rounds_done(run: Path) -> list[int]:
    """The rounds whose final fine-tune is sealed, in order."""
    return sorted(int(p.parent.parent.name[5:]) for p in Path(run).glob("round*/final/manifest.json"))


def final_adapter(run: Path) -> Path:
    """The adapter.gguf of a run's last round (the evolved model)."""
    done = rounds_done(run)
    if not done:
        raise UserError(f"{run}: no finished final fine-tune yet; run `semievol run` on it to the end first")
    return Path(run) / f"round{done[-1]}" / "final" / "adapter.gguf"


def adapter_path(path: Path) -> Path:
    """An adapter given as a .gguf file, a training folder (`semievol train --out`) or a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "adapter.gguf").is_file():
        return path / "adapter.gguf"
    if (path / "run.json").exists():
        return final_adapter(path)
    raise UserError(f"{path}: no adapter there; give an adapter.gguf, a `semievol train` folder or a run folder")


def _task_folder(run: Path, meta: dict, data: Path | None) -> Path:
    folder = Path(data or meta["data"])
    if not folder.exists():
        raise UserError(f"{run}: its task folder {folder} is not there (run.json names it relative to where the run "
                        "was started); give it with --data")
    return folder


def training_rows(run: Path, data: Path | None = None) -> list[dict]:
    """Labeled rows, then each round's selected pseudo-labeled rows (answer = pseudo-label)."""
    run = Path(run)
    meta = run_record(run)
    folder = _task_folder(run, meta, data)
    labeled = load_split(find_split_file(folder, "labeled"), "labeled").items
    labeled = head(labeled, meta.get("run", {}).get("limit_labeled"))  # the rows the run trained on
    unlabeled = {it.index: it for it in load_split(find_split_file(folder, "unlabeled"), "unlabeled",
                                                   with_answers=False).items}
    _same_labeled(run, labeled, folder)
    rows = [_row(it, it.answer, "labeled", 0, None) for it in labeled]
    for r in rounds_done(run):
        for line in (run / f"round{r}" / "selection" / "pseudo_labels.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["selected"]:
                rows.append(_row(unlabeled[rec["index"]], rec["pseudo_label"], "pseudo", r, rec["entropy"]))
    return rows


def _same_labeled(run: Path, labeled: list[Item], folder: Path) -> None:
    """The labeled split is the one the run trained on (a changed file would export rows it never saw)."""
    from ..core.runfolder import items_digest

    try:
        trained = json.loads((run / "warmup" / "inputs.json").read_text())["inputs"]["items"]
    except (OSError, ValueError, KeyError):
        return
    if trained != items_digest(labeled, True):
        raise UserError(f"{folder}: its labeled split is not the one {run} trained on (changed since the run?); "
                        "give the run's own task folder with --data")


def _row(it: Item, answer: str, source: str, rnd: int, entropy: float | None) -> dict:
    return {"question": it.question, "options": list(it.options), "answer": answer, "source": source,
            "round": rnd, "entropy": entropy, "source_index": it.index}


def row_item(row: dict, index: int = 0) -> Item:
    return Item(index=index, question=row["question"], options=tuple(row["options"]), answer=row["answer"])


# --- formats ------------------------------------------------------------------------------------------

def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "options": json.dumps(r["options"], ensure_ascii=False) if r["options"] else "",
                    "entropy": "" if r["entropy"] is None else r["entropy"]})
    return buf.getvalue()


def rows_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def chat_record(row: dict) -> dict:
    """mlx-lm's chat format: the messages our trainer renders (no demonstrations) and the target it learns."""
    it = row_item(row)
    return {"messages": [*question_messages(it), {"role": "assistant", "content": answer_text(it, it.answer)}]}


_SYSTEM, _PROMPT = "\x00SYSTEM\x00", "\x00PROMPT\x00"


def ollama_template(template: ChatTemplate, adds_bos: bool) -> str:
    """The GGUF's chat template as an Ollama (Go) TEMPLATE: the prompt our engine renders for a user turn (with
    or without a system message), with the message texts replaced by `{{ .Prompt }}` and `{{ .System }}`. Where
    the tokenizer puts BOS before a text itself (`adds_bos`, from the GGUF), a leading BOS in the rendered
    template is left out, as our tokenizer leaves it out (else Ollama would give two)."""

    def go(messages: list[dict]) -> str:
        text = template.prompt(messages)
        if adds_bos and template.bos_token and text.startswith(template.bos_token):
            text = text[len(template.bos_token):]
        text = text.replace("{{", '{{ "{{" }}')
        return text.replace(_SYSTEM, "{{ .System }}").replace(_PROMPT, "{{ .Prompt }}")

    plain = go([{"role": "user", "content": _PROMPT}])
    with_system = go([{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _PROMPT}])
    return "{{ if .System }}" + with_system + "{{ else }}" + plain + "{{ end }}{{ .Response }}" + template.eos_token


def modelfile(model_path: Path, adapter_name: str | None, template: ChatTemplate, adds_bos: bool) -> str:
    """An Ollama Modelfile: `FROM ./model.gguf` for a merged file (`adapter_name` None), which every Ollama
    version loads; else the base GGUF with `ADAPTER`, which Ollama 0.34.1 and later refuse."""
    tmpl = ollama_template(template, adds_bos).replace('"""', '\\"\\"\\"')
    if adapter_name is None:
        lines = ["# Written by `semievol export --merged`: the base GGUF with the run's LoRA adapter merged in, one",
                 "# self-contained file that every Ollama version loads (`ollama create NAME -f Modelfile`).",
                 "# (Without --merged the export serves the base with `ADAPTER`, which Ollama 0.34.1 and later",
                 '# refuse: "LoRA adapters are no longer supported".)',
                 "# The model answers prompts in its training format (the user messages of chat.jsonl: the question,",
                 '# lettered options where there are any, and the instruction) with "Answer: ...".',
                 "FROM ./model.gguf", f'TEMPLATE """{tmpl}"""']
    else:
        lines = ["# Written by `semievol export`: the base GGUF with the run's LoRA adapter, as llama.cpp serves them.",
                 "# `ADAPTER` needs an Ollama before 0.34.1 (later versions refuse it: export with --merged, which",
                 "# writes model.gguf and a Modelfile with `FROM ./model.gguf` that every version loads).",
                 "# The adapter answers prompts in its training format (the user messages of chat.jsonl: the question,",
                 '# lettered options where there are any, and the instruction) with "Answer: ...".',
                 f"FROM {Path(model_path).resolve()}", f"ADAPTER ./{adapter_name}", f'TEMPLATE """{tmpl}"""']
    if template.eos_token:
        lines.append(f'PARAMETER stop "{template.eos_token}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter `permute` of Q/K output rows (HF's rotate-half layout -> interleaved rope
    pairs): the first axis back to the Hugging Face order. `w` is (out, ...) with out = n_head * head_dim."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def peft_adapter(adapter_dir: Path, model_path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The MLX adapter of `adapter_dir` as Hugging Face PEFT LoRA tensors and adapter_config.json.

    PEFT computes W x + (lora_alpha / r) B A x with A (r, in) and B (out, r); mlx-lm computes
    W x + scale (x a) b with a (in, r) and b (r, out): A = a^T, B = b^T, lora_alpha = scale x r. On an
    architecture whose GGUF permutes Q/K rows for interleaved rope (llama), B's rows of q_proj and k_proj are
    put back in the Hugging Face order, so the adapter applies to the Hugging Face base model."""
    from .. import training  # noqa: F401  its import loads the fast BLAS before MLX's
    import mlx.core as mx

    from ..core.gguf_file import read
    from ..training.gguf_loader import ARCHITECTURES, Meta

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    lora = cfg["lora_parameters"]
    meta = Meta(Path(model_path), read(Path(model_path)).fields)
    n_head = meta.get("attention.head_count")
    n_kv = meta.get("attention.head_count_kv", n_head)
    interleaved = ARCHITECTURES[meta.arch].rope == "interleaved"
    flat = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(Path(adapter_dir) / "adapters.safetensors")).items()}
    tensors, layers, modules = {}, set(), set()
    for name in sorted(flat):
        if not name.endswith(".lora_a"):
            continue
        mod = name[: -len(".lora_a")]
        a, b = flat[name], flat[mod + ".lora_b"]  # (in, r), (r, out)
        lora_b = b.T
        if interleaved and mod.endswith(("q_proj", "k_proj")):
            lora_b = unpermute_rows(lora_b, n_head if mod.endswith("q_proj") else n_kv)
        tensors[f"base_model.model.{mod}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = np.ascontiguousarray(lora_b)
        layers.add(int(mod.split(".")[2]))
        modules.add(mod.rsplit(".", 1)[1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"],
              "lora_alpha": lora["scale"] * lora["rank"], "lora_dropout": lora.get("dropout", 0.0), "bias": "none",
              "fan_in_fan_out": False, "target_modules": sorted(modules), "layers_to_transform": sorted(layers),
              "inference_mode": True, "base_model_name_or_path": None,
              "semievol": {"gguf": str(model_path), "architecture": meta.arch}}
    return tensors, config


def write_peft(folder: Path, tensors: dict[str, np.ndarray], config: dict) -> None:
    from .. import training  # noqa: F401  its import loads the fast BLAS before MLX's
    import mlx.core as mx

    folder.mkdir()
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), {k: mx.array(v) for k, v in tensors.items()},
                        metadata={"format": "pt"})
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2))


# --- writing --------------------------------------------------------------------------------------

def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists; choose a new folder")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no folder {out.parent}; create it first")


def base_model(folder: Path) -> Path:
    """The base GGUF of a run folder (run.json) or a `semievol train` folder (adapter_config.json), which must
    still be there."""
    folder = Path(folder)
    if (folder / "run.json").exists() or not (folder / "adapter_config.json").is_file():
        model = Path(run_record(folder)["model"])
    else:
        model = Path(json.loads((folder / "adapter_config.json").read_text())["model"])
    if not model.is_file():
        raise UserError(f"{folder}: its model {model} is not there any more; the export needs the base GGUF")
    return model


def export_run(run: Path, out: Path, engine, *, data: Path | None = None, peft: bool = False, merged: bool = False,
               outtype: str | None = None, say=lambda msg: None, progress=None) -> dict:
    """Write train.csv, train.jsonl, chat.jsonl (and mlx-lm/train.jsonl, the same records where
    `mlx_lm.lora --data` looks), adapter.gguf and Modelfile into `out`, a new folder: built beside it and
    renamed into place, so a failure leaves nothing behind. `merged`: also model.gguf, the base with the
    adapter merged in (checked against base + adapter, `merge`), which the Modelfile then serves.
    `engine`: the base model in llama.cpp (its template and tokenizer; with `merged`, its prompts)."""
    from . import merge

    run, out = Path(run), Path(out)
    check_out(out)
    merge.check_outtype(outtype)
    if outtype and not merged:
        raise UserError("--outtype is the merged file's type; give --merged too")
    meta = run_record(run)
    model = base_model(run)
    adapter = final_adapter(run)
    rows = training_rows(run, data)
    summary = {}
    with atomic_folder(out) as tmp:
        atomic_write_text(tmp / "train.csv", rows_csv(rows))
        atomic_write_text(tmp / "train.jsonl", rows_jsonl(rows))
        chat = "".join(json.dumps(chat_record(r), ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(tmp / "chat.jsonl", chat)
        (tmp / "mlx-lm").mkdir()
        atomic_write_text(tmp / "mlx-lm" / "train.jsonl", chat)
        shutil.copyfile(adapter, tmp / "adapter.gguf")
        if merged:
            test = run_test_items(run, meta, data)
            summary = merged_file(engine, model, adapter, tmp / "model.gguf", test, outtype=outtype, say=say,
                                  reference=last_round_eval(run), progress=progress)
            atomic_write_json(tmp / "merge.json", summary)
        atomic_write_text(tmp / "Modelfile", modelfile(model, None if merged else "adapter.gguf", engine.template,
                                                       engine.adds_bos))
        if peft:
            write_peft(tmp / "peft", *peft_adapter(adapter.parent, model))
    n_pseudo = sum(r["source"] == "pseudo" for r in rows)
    return {"rows": len(rows), "labeled": len(rows) - n_pseudo, "pseudo": n_pseudo, "rounds": rounds_done(run),
            "adapter": str(adapter), "model": str(model), "out": str(out), **summary}


def export_trained(folder: Path, out: Path, engine, items: list[Item], *, outtype: str | None = None,
                   say=lambda msg: None, progress=None) -> dict:
    """A `semievol train` folder's adapter merged into its base: `out`/model.gguf and its Modelfile, checked on
    `items` (the split given with --data: its prompts, and its answers for both accuracies)."""
    from . import merge

    folder, out = Path(folder), Path(out)
    check_out(out)
    merge.check_outtype(outtype)
    model = base_model(folder)
    with atomic_folder(out) as tmp:
        summary = merged_file(engine, model, folder / "adapter.gguf", tmp / "model.gguf", items, outtype=outtype,
                              say=say, reference=None, progress=progress)
        atomic_write_json(tmp / "merge.json", summary)
        atomic_write_text(tmp / "Modelfile", modelfile(model, None, engine.template, engine.adds_bos))
    return {"adapter": str(folder / "adapter.gguf"), "model": str(model), "out": str(out), **summary}


def run_test_items(run: Path, meta: dict, data: Path | None) -> list[Item]:
    """The test questions a run was evaluated on (its --limit-test first ones)."""
    items = load_split(find_split_file(_task_folder(run, meta, data), "test"), "test").items
    return head(items, meta.get("run", {}).get("limit_test"))


def last_round_eval(run: Path) -> dict:
    return json.loads((Path(run) / f"round{rounds_done(run)[-1]}" / "eval" / "eval.json").read_text())


def merged_file(engine, model: Path, adapter: Path, dst: Path, items: list[Item], *, outtype: str | None, say,
                reference: dict | None, progress=None) -> dict:
    """`merge.merge_model` on the prompts of `items`, then the test accuracy of the merged file (computing with
    the file itself, as another front end would) beside that of base + adapter (`reference`, the run's own
    evaluation, or measured here), question by question. `progress(total, description)`: a context manager
    yielding `advance(status=...)`, for a bar over each evaluation."""
    from ..core.config import EngineConfig
    from ..core.data import Split
    from ..engines import load
    from .evaluate import evaluate
    from .merge import KL_PROMPTS, merge_model
    from .report import paired

    if not items:
        raise UserError("no questions to check the merged file on; give a split with rows")
    seqs = [engine.tokenize(engine.template.prompt(question_messages(it), answer_prefix=it.closed))
            for it in items[:KL_PROMPTS]]
    # one model in memory at a time: the merge's check loads its own (the 8B shape's export held 17.7 GB with the
    # base engine loaded beside them); the engine loads its weights again when next asked
    engine.release()
    summary = merge_model(model, adapter, dst, seqs, outtype=outtype, say=say)
    split = Split("test", Path("."), list(items))

    def accuracy(eng, description: str) -> dict:
        if progress is None:
            say(f"{description} on {len(items)} questions")
            return evaluate(eng, split).as_dict()
        with progress(len(items), description) as advance:
            return evaluate(eng, split, on_item=lambda p: advance(status="ok" if p.correct else "miss")).as_dict()

    if reference is None:
        engine.set_adapter(adapter)
        reference = accuracy(engine, "test accuracy of base + adapter")
        engine.set_adapter(None)
        engine.release()
    mine = load(dst, EngineConfig(weights="file", n_ctx=engine.n_ctx), shared=False)  # as another front end would
    try:
        got = accuracy(mine, "test accuracy of the merged file")
    finally:
        mine.close()
    pv = paired(got, reference) or {}
    return {**summary, "accuracy_base_adapter": reference["accuracy"], "accuracy_merged": got["accuracy"],
            "questions": len(items), "answers_differ": pv.get("only_first", 0) + pv.get("only_second", 0),
            "p_merged_vs_adapter": pv.get("p_value")}

