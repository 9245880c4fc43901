"""Tasks and their splits: CSV/JSONL rows in the paper's columns, validated, nothing else.

A task is a folder with `labeled`, `unlabeled` and `test` files (`.csv` or `.jsonl`), or explicit files.
Columns: `question`; `options` (a JSON list; absent or empty for open-answer rows); `answer` (the option's
letter, or for open answers a number or short text). Other columns are kept as metadata (labeled and test
splits only; per-category tables read them) and never reach a prompt. The unlabeled split is loaded *without* its answers: they are read only by
`load_heldout`, for reporting how accurate the pseudo-labels were.
This module does no prompting and no I/O beyond reading the files it is given.
"""
from __future__ import annotations

import csv
import io
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

SPLITS = ("labeled", "unlabeled", "test")
EXTENSIONS = (".csv", ".jsonl")
LETTERS = string.ascii_uppercase
# Columns that name a category for per-category tables, in order of preference.
CATEGORY_COLUMNS = ("category", "Subject", "subject", "meta_info")

csv.field_size_limit(1 << 30)


@dataclass(frozen=True)
class Item:
    """One question. `answer` is None for unlabeled items (the answer is held apart)."""

    index: int  # position in its split, 0-based
    question: str
    options: tuple[str, ...]  # empty for open-answer items
    answer: str | None
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def closed(self) -> bool:
        return bool(self.options)

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


@dataclass
class Split:
    name: str
    path: Path
    items: list[Item]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def closed(self) -> bool:
        return all(it.closed for it in self.items)

    def category_column(self) -> str | None:
        for col in CATEGORY_COLUMNS:
            if self.items and all(col in it.meta for it in self.items):
                return col
        return None


def find_split_file(folder: Path, split: str) -> Path:
    """The file of one split in a task folder: `<split>.csv` or `<split>.jsonl`."""
    folder = Path(folder)
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if not folder.exists():
        raise UserError(f"{folder}: no such task folder or file; give a folder with labeled/unlabeled/test files")
    if folder.is_file():
        return folder
    found = [folder / f"{split}{ext}" for ext in EXTENSIONS if (folder / f"{split}{ext}").exists()]
    if not found:
        raise UserError(f"{folder}: no '{split}' split (expected {split}.csv or {split}.jsonl in that folder)")
    if len(found) > 1:
        raise UserError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0]


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row dict) for every record in a CSV or JSONL file."""
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty; it needs a header and at least one row")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path}: a binary file, not {'JSONL' if path.suffix == '.jsonl' else 'CSV'} text; "
                        "give a UTF-8 text file with one question per row")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel writes one) is accepted and dropped
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(io.StringIO(text, newline=None), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((lineno, row))
    else:
        # newline='': the csv module sees \\r\\n (Windows) and quoted line breaks as they are
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        try:
            header = reader.fieldnames
            if not header:
                raise UserError(f"{path}: no header row; the first line must name the columns")
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                if None in row:
                    raise UserError(f"{path}:{start}: more fields than the header has columns; quote fields that contain commas")
                if any(v is None for v in row.values()):
                    raise UserError(f"{path}:{start}: fewer fields than the header has columns")
                rows.append((start, row))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: CSV does not parse ({e}); check the quoting on that row") from None
    if not rows:
        raise UserError(f"{path}: no rows; the file needs at least one question")
    return rows


def _parse_options(raw, where: str) -> tuple[str, ...]:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return ()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f'{where}: options is not a JSON list (got {raw[:60]!r}); write it as ["first", "second", ...]') from None
    if not isinstance(raw, list) or not all(isinstance(o, (str, int, float)) for o in raw):
        raise UserError(f'{where}: options must be a JSON list of strings, like ["first", "second"]')
    if len(raw) > len(LETTERS):
        raise UserError(f"{where}: {len(raw)} options; at most {len(LETTERS)} are supported")
    options = tuple(str(o) for o in raw)
    for i, o in enumerate(options):
        if not o.strip():
            raise UserError(f"{where}: option {LETTERS[i]} is empty; every option needs text")
    return options


def load_split(path: Path, name: str, *, with_answers: bool = True) -> Split:
    """Read and validate one split. With `with_answers=False` the answer column is not even parsed."""
    path = Path(path)
    items: list[Item] = []
    for index, (lineno, row) in enumerate(read_rows(path)):
        where = f"{path}:{lineno}"
        if "question" not in row:
            cols = ", ".join(map(str, row.keys()))
            raise UserError(f"{where}: no 'question' column (columns are: {cols}); rename the question column to 'question'")
        question = row["question"]
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{where}: empty question; every row needs question text")
        options = _parse_options(row.get("options"), where)
        answer = None
        if with_answers:
            if "answer" not in row:
                raise UserError(f"{where}: no 'answer' column; the {name} split needs the answer of every row")
            answer = str(row["answer"]).strip()
            if options:
                letters = LETTERS[: len(options)]
                if answer.isdecimal() and 1 <= int(answer) <= len(options):
                    answer = letters[int(answer) - 1]  # a numbered option (ARC labels some questions 1-4)
                if len(answer) != 1 or answer.upper() not in letters:
                    raise UserError(
                        f"{where}: answer {answer!r} is not a letter within the options ({letters[0]}-{letters[-1]}); "
                        f"write the option's letter (A for the first) or its number (1-{len(options)})")
                answer = answer.upper()
            elif not answer:
                raise UserError(f"{where}: empty answer; open-answer rows need a number or short text")
        # An unlabeled row keeps nothing but its question and options: an extra column may hold the answer in
        # other words (fpb's `gt`), and no prompt, selection or report needs one.
        meta = {k: v for k, v in row.items() if k not in ("question", "options", "answer")} if with_answers else {}
        items.append(Item(index=index, question=question, options=options, answer=answer, meta=meta))
    return Split(name=name, path=path, items=items)


def duplicate_options(item: Item) -> list[tuple[str, str]]:
    """Pairs of option letters whose texts are the same (up to case and spacing). Accepted, since the paper's
    own splits hold such rows (ARC, MMLU, MMLU-Pro), but a model cannot tell those options apart, so
    `semievol data check` lists them."""
    seen: dict[str, int] = {}
    pairs = []
    for i, o in enumerate(item.options):
        key = " ".join(o.split()).lower()
        if key in seen:
            pairs.append((LETTERS[seen[key]], LETTERS[i]))
        else:
            seen[key] = i
    return pairs


def load_heldout(path: Path) -> list[Item]:
    """The unlabeled split with its answers, for *reporting* pseudo-label accuracy only. Never feed these to a
    predictor."""
    return load_split(path, "unlabeled (answers, for the report only)").items


@dataclass
class Task:
    folder: Path
    splits: dict[str, Split]

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]


def head(items: list[Item], n: int | None) -> list[Item]:
    """The first `n` items (a run's --limit-labeled, --limit-unlabeled or --limit-test); 0 or None: all."""
    return items[:n] if n else items


def limited(task: Task, cfg) -> tuple[list[Item], list[Item], list[Item]]:
    """The labeled, unlabeled and test items, each cut to its first N by the run's --limit-labeled,
    --limit-unlabeled and --limit-test (0: all)."""
    return (head(task["labeled"].items, cfg.limit_labeled), head(task["unlabeled"].items, cfg.limit_unlabeled),
            head(task["test"].items, cfg.limit_test))


def load_task(folder: Path, splits: tuple[str, ...] = SPLITS) -> Task:
    """Load the requested splits of a task folder. The unlabeled split comes without answers."""
    folder = Path(folder)
    loaded = {}
    for name in splits:
        path = find_split_file(folder, name)
        loaded[name] = load_split(path, name, with_answers=(name != "unlabeled"))
    return Task(folder=folder, splits=loaded)
