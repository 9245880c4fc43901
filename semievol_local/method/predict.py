"""Label new rows with a model (and adapter): each row's predicted answer, its option distribution (score mode)
or generated text (sample mode), and its entropy, in input order.

Rows are asked one by one (`evaluate.predict_item`, the question eval asks) and each finished row is appended
to a partial file beside the output, so an interrupted run resumes where it stopped; the output file itself
appears only when every row is done, whole. The partial file starts with what the rows were computed from
(model, adapter, data, mode and the options that change an answer): a partial left by different inputs is
started over, never mixed in. This module does no drawing; progress goes to a callback.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

from ..core.data import LETTERS, Split
from ..core.errors import UserError
from ..core.files import Journal, atomic_write_text
from ..engines.protocol import InferenceEngine
from .evaluate import predict_item

FORMATS = (".csv", ".jsonl")
# the columns predict adds to every row (an input column of the same name would be overwritten: refused)
ADDED = ("prediction", "prediction_text", "entropy", "probs", "text", "prompt_shortened")


def partial_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial.jsonl")


def check_out(out: Path, split: Split, columns: list[str]) -> None:
    """Refuse an output the rows cannot be written to, before any model loads."""
    if out.suffix not in FORMATS:
        raise UserError(f"--out {out}: write .csv or .jsonl")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no folder {out.parent}; create it first")
    if out.resolve() == split.path.resolve():
        raise UserError(f"--out {out}: that is the input file; choose another name")
    clash = [c for c in columns if c in ADDED or (c.startswith("p_") and c[2:] in LETTERS)]
    if clash:
        raise UserError(f"{split.path}: column {clash[0]!r} is one predict writes; rename it in the input")


def predict(engine: InferenceEngine, split: Split, rows: list[dict], out: Path, *, mode: str, max_tokens: int, identity: dict,
            on_resume: Callable[[int], None] = lambda n: None, on_item: Callable[[dict], None] = lambda rec: None) -> dict:
    """Predict every row of `split` (loaded without answers) and write `out` (.csv or .jsonl): `rows`, the input
    rows as `data.read_rows` read them, then the prediction columns. Returns counts (rows, resumed, shortened)."""
    journal = Journal(partial_path(out), identity)
    # finished rows by position (a journal written before rows were numbered is in input order)
    done = {r.pop("row", i): r for i, r in enumerate(journal.done)}
    journal.done = [{"row": i, **r} for i, r in sorted(done.items())]  # kept numbered when rewritten
    resumed = len(done)
    on_resume(resumed)
    with journal:
        engine.reset()
        todo = [i for i in range(len(split.items)) if i not in done]
        # in order in process; over a fleet of llama-servers concurrently, as they finish
        for i, (pred, cut) in engine.each(todo, lambda eng, i: predict_item(eng, split.items[i], mode=mode,
                                                                            max_tokens=max_tokens)):
            item = split.items[i]
            rec = {"prediction": pred.predicted, "entropy": pred.entropy, "prompt_shortened": bool(cut)}
            if item.closed and pred.predicted is not None:
                rec["prediction_text"] = item.options[LETTERS.index(pred.predicted)]
            if pred.probs is not None:
                rec["probs"] = dict(zip(item.letters, pred.probs))
            if pred.text is not None:
                rec["text"] = pred.text
            journal.write({"row": i, **rec})
            done[i] = rec
            on_item(rec)
    preds = [done[i] for i in range(len(split.items))]
    atomic_write_text(out, render(rows, preds, out.suffix))
    journal.remove()
    return {"rows": len(preds), "resumed": resumed, "prompts_shortened": sum(r["prompt_shortened"] for r in preds)}


def render(rows: list[dict], preds: list[dict], fmt: str) -> str:
    """The output text: each input row followed by its prediction columns. In CSV the distribution is one
    column per option letter (`p_A`, `p_B`, ...) and options stay a JSON list; in JSONL `probs` is an object
    and options a list."""
    if fmt == ".jsonl":
        out = []
        for row, p in zip(rows, preds):
            row = dict(row)
            if isinstance(row.get("options"), str) and row["options"].strip():
                row["options"] = json.loads(row["options"])
            out.append(json.dumps({**row, **p}, ensure_ascii=False) + "\n")
        return "".join(out)
    n_letters = max((len(p.get("probs") or {}) for p in preds), default=0)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    columns += ["prediction", "prediction_text", "entropy", *[f"p_{c}" for c in LETTERS[:n_letters]]]
    if any("text" in p for p in preds):
        columns.append("text")
    columns.append("prompt_shortened")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row, p in zip(rows, preds):
        flat = {k: (json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v) for k, v in row.items()}
        flat.update({k: v for k, v in p.items() if k != "probs"})
        flat.update({f"p_{c}": v for c, v in (p.get("probs") or {}).items()})
        w.writerow(flat)
    return buf.getvalue()
