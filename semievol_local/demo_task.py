"""The demo task that ships with the project: short product reviews, three sentiment classes.

Made here, from templates and a fixed seed, so it carries no one else's data or licence. Run
`python -m semievol_local.demo_task` to write `demo_data/{labeled,unlabeled,test}.csv` again
(the output is byte-for-byte the same each time).
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

OPTIONS = ["negative", "neutral", "positive"]
PRODUCTS = ["headphones", "kettle", "backpack", "desk lamp", "phone case", "blender", "running shoes",
            "keyboard", "coffee grinder", "umbrella", "tent", "monitor", "water bottle", "office chair",
            "toaster", "rain jacket", "bike light", "frying pan", "charger", "suitcase"]
POSITIVE = ["works perfectly", "exceeded my expectations", "is sturdy and well made", "was worth every penny",
            "arrived early and works great", "is the best I have owned", "feels premium", "made my mornings easier",
            "has held up beautifully", "does exactly what I wanted"]
NEGATIVE = ["broke after two days", "stopped working within a week", "feels cheap and flimsy",
            "was a waste of money", "arrived damaged", "is worse than the old one", "keeps overheating",
            "fell apart on first use", "smells of burnt plastic", "was returned for a refund"]
NEUTRAL = ["arrived on Tuesday", "comes in a grey box", "is the same size as described", "has a two-year warranty",
           "was bought for my brother", "is available in three colours", "came with a manual", "weighs about a kilo",
           "was delivered by courier", "replaced an older model"]
OPENERS = ["", "Honestly, ", "So far, ", "After a month, ", "For the record, ", "Overall, "]
ENDINGS = [".", "!", ". Would say the same again.", ". That is all.", ". Five stars from my partner.",
           ". One star from my partner."]
QUESTION = "What is the sentiment of this product review?\n"
SIZES = {"labeled": 64, "unlabeled": 64, "test": 48}
# Class balance like many real tasks: neutral is the majority.
WEIGHTS = {"negative": 0.3, "neutral": 0.4, "positive": 0.3}


def make_rows(seed: int = 20241018) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    phrases = {"negative": NEGATIVE, "neutral": NEUTRAL, "positive": POSITIVE}
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in SIZES.items():
        rows = []
        while len(rows) < n:
            label = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            text = f"{rng.choice(OPENERS)}the {rng.choice(PRODUCTS)} {rng.choice(phrases[label])}{rng.choice(ENDINGS)}"
            text = text[0].upper() + text[1:]
            if text in seen:
                continue
            seen.add(text)
            rows.append({"question": QUESTION + text, "options": json.dumps(OPTIONS),
                         "answer": "ABC"[OPTIONS.index(label)], "label": label})
        out[split] = rows
    return out


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in make_rows().items():
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["question", "options", "answer", "label"], lineterminator="\n")
            w.writeheader()
            w.writerows(rows)


def demo_folder() -> Path:
    return Path(__file__).parent / "demo_data"


if __name__ == "__main__":
    write(demo_folder())


def _demo_configs():
    """The demo's settings: the paper's recipe, sized to finish within 10 minutes on 2 CPU cores.

    The 135M model needs about 50 optimizer steps before it answers more than the label prior, so the
    warm-up takes 7 epochs of the 64 labeled reviews (56 steps). The final fine-tune continues the warm
    adapter on the selected pseudo-labels (the official code's choice, `--final-from-warm`): retraining
    from the base on labeled + selected would cost more steps than the 10-minute budget has."""
    from .config import RunConfig, TrainConfig

    return RunConfig(theta=50.0, final_from_warm=True), TrainConfig(epochs=7.0, lr=3e-4, batch_size=8, grad_clip=1.0)


DEMO_RUN, DEMO_TRAIN = _demo_configs()
