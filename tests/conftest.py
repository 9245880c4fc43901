"""Shared fixtures: tiny GGUF models and task folders written by the tests, and the real default model."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tinymodel import write_tiny_gguf  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "semievol"


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory) -> Path:
    """Float32 inference copies (`--weights auto`) go to a folder of this test session, not the user's cache."""
    import os

    folder = tmp_path_factory.mktemp("weights")
    os.environ["SEMIEVOL_WEIGHTS"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-block llama GGUF with float32 weights."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-f32.gguf", qtype="F32")


@pytest.fixture(scope="session")
def tiny_q4(tmp_path_factory) -> Path:
    """The same shape with Q4_1 block weights, like the default model."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-q4_1.gguf", qtype="Q4_1")


def write_split(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write rows as CSV or JSONL (by suffix); options lists are JSON-encoded in CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    columns = columns or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def make_rows(n: int, seed: int = 0, *, category: bool = True) -> list[dict]:
    """Closed-set toy questions: 'Which word is a colour?' style, with a category column."""
    import random

    rng = random.Random(seed)
    colours, others = ["red", "blue", "green", "yellow"], ["table", "river", "seven", "quickly", "cloud", "paper"]
    rows = []
    for i in range(n):
        opts = rng.sample(others, 2)
        pos = rng.randrange(3)
        opts.insert(pos, rng.choice(colours))
        row = {"question": f"Question {i}: which word is a colour?", "options": opts, "answer": "ABC"[pos]}
        if category:
            row["category"] = ["easy", "hard"][i % 2]
        rows.append(row)
    return rows


@pytest.fixture
def tiny_task(tmp_path) -> Path:
    return write_task(tmp_path / "task")


def write_task(folder: Path) -> Path:
    """The tiny task: 12 labeled, 20 unlabeled and 10 test questions."""
    write_split(folder / "labeled.csv", make_rows(12, 1))
    write_split(folder / "unlabeled.csv", make_rows(20, 2))
    write_split(folder / "test.csv", make_rows(10, 3))
    return folder


@pytest.fixture(scope="session")
def default_model() -> Path:
    from semievol_local.method import models

    return models.resolve(models.DEFAULT_MODEL)


@pytest.fixture
def shared_task():
    def get(name: str) -> Path:
        folder = SHARED / name
        if not folder.is_dir():
            pytest.skip(f"{folder} is absent")
        return folder

    return get
