"""The demo task that ships with the project: short product reviews, three sentiment classes.

Made here, from templates and a fixed seed, so it carries no one else's data or licence. Run
`python -m semievol_local.method.demo_task` to write `demo_data/{labeled,unlabeled,test}.csv` again
(the output is byte-for-byte the same each time), and `demo_data_open/`: the same reviews as open-answer
questions whose answer is the sentiment word itself (no options), for sample mode (`semievol demo --open`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path

OPTIONS = ["negative", "neutral", "positive"]
PRODUCTS = ["headphones", "kettle", "backpack", "desk lamp", "phone case", "blender", "running shoes",
            "keyboard", "coffee grinder", "umbrella", "tent", "monitor", "water bottle", "office chair",
            "toaster", "rain jacket", "bike light", "frying pan", "charger", "suitcase"]
POSITIVE = ["works perfectly", "exceeded my expectations", "is sturdy and well made", "was worth every penny",
            "arrived early and works great", "is the best I have owned", "feels premium", "made my mornings easier",
            "has held up beautifully", "does exactly what I wanted", "is a joy to use", "is brilliant",
            "works like a charm", "is excellent value", "impressed the whole family", "is beautifully designed",
            "runs quietly and reliably", "is comfortable all day", "is the perfect gift",
            "outperforms the expensive brands", "is fantastic", "still looks brand new", "is wonderfully simple",
            "does the job brilliantly", "made a real difference", "is solid and reliable", "has been flawless",
            "is lovely to hold", "is a great buy", "delighted me"]
NEGATIVE = ["broke after two days", "stopped working within a week", "feels cheap and flimsy",
            "was a waste of money", "arrived damaged", "is worse than the old one", "keeps overheating",
            "fell apart on first use", "smells of burnt plastic", "was returned for a refund",
            "is a total disappointment", "leaks everywhere", "is badly made", "broke the first time I used it",
            "is useless", "rattles and squeaks", "died after a month", "is far too flimsy", "scratched within a day",
            "is overpriced junk", "gave me nothing but trouble", "stopped charging", "cracked in the cold", "is awful",
            "was missing parts", "is painfully slow", "tore at the seams", "is the worst purchase this year",
            "let me down", "started peeling"]
NEUTRAL = ["arrived on Tuesday", "comes in a grey box", "is the same size as described", "has a two-year warranty",
           "was bought for my brother", "is available in three colours", "came with a manual", "weighs about a kilo",
           "was delivered by courier", "replaced an older model", "is made of plastic", "was ordered on Monday",
           "has a black handle", "comes with two cables", "fits in a drawer", "was shipped from Germany",
           "has a serial number on the back", "is the 2023 model", "uses a standard plug", "is sold in pairs",
           "came in a cardboard box", "has three settings", "is twenty centimetres tall", "was a birthday present",
           "is the medium size", "has a matte finish", "was bought in a shop", "needs four batteries",
           "is also sold in blue", "arrived with the receipt"]
OPENERS = ["", "Honestly, ", "So far, ", "After a month, ", "For the record, ", "Overall, "]
ENDINGS = [".", "!", ". Would say the same again.", ". That is all.", ". Five stars from my partner.",
           ". One star from my partner."]
QUESTION = "What is the sentiment of this product review?\n"
SIZES = {"labeled": 64, "unlabeled": 48, "test": 48}
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


OPEN_QUESTION = "What is the sentiment of this product review? Answer with one word: negative, neutral or positive.\n"


def make_open_rows(seed: int = 20241018) -> dict[str, list[dict]]:
    """The same reviews as open-answer rows: no options, the answer is the word."""
    return {split: [{"question": OPEN_QUESTION + r["question"][len(QUESTION):], "answer": r["label"]} for r in rows]
            for split, rows in make_rows(seed).items()}


def write(folder: Path, open_answers: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    splits = make_open_rows() if open_answers else make_rows()
    for split, rows in splits.items():
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)


def demo_folder(open_answers: bool = False) -> Path:
    return Path(__file__).parent / ("demo_data_open" if open_answers else "demo_data")


if __name__ == "__main__":
    write(demo_folder())
    write(demo_folder(open_answers=True), open_answers=True)


def _demo_configs():
    """The demo's settings: the paper's recipe, sized for 2 CPU cores.

    On 57 training reviews the default lr (3e-4) spikes and settles on the label prior; lr 1e-4 with
    batches of 4 learns the task after about 80 steps. The demo took 9 epochs at 1.5e-4 (135 steps; 6
    epochs, 90 steps, stayed on the prior) while a tenth of the rows was held out; every one of the 64
    labeled reviews trains now, and 8 epochs make 128 steps. Each class has 30 phrasings, so the 64
    labeled reviews leave some unseen: the unlabeled reviews are where the others come from.

    The final fine-tune is the paper's (Eq. 9): from the base model on labeled + selected, global
    threshold. With LoRA on the last 16 blocks (frozen blocks cached), measured on 2 AMD EPYC cores: SFT
    0.896, SemiEvol 0.938 (3 questions gained, 1 lost: McNemar p 0.63), in about 7 minutes. On a 2-core
    Intel Xeon machine (an earlier CI host) the same training ran 5x slower (69 tokens/s: warm-up 824 s, the
    whole demo about 37 minutes, SFT 0.896 with every row). LoRA on the last 8 blocks ran 1.7x faster per
    step there but learned nothing in the warm-up's 128 steps (SFT 0.500); so the demo keeps 16 blocks and
    gives the final fine-tune 6 epochs (132 steps over labeled + about 24 selected reviews, as many as the
    warm-up needed) instead of 8 (176 steps).

    The official code's continuation of M_warm on the selected only (lr 3e-5, per-class threshold), which
    an earlier demo used to save time, changed no test answer (0.896).
    """
    from ..core.config import RunConfig, TrainConfig

    return RunConfig(final_epochs=6.0), TrainConfig(epochs=8.0, lr=1.5e-4, batch_size=4, grad_clip=1.0)


DEMO_RUN, DEMO_TRAIN = _demo_configs()
# The open-answer variant: the paper's generative recipe (sample mode: learners sample at temperature 1, the
# justifier decodes greedily, entropy is the mean NLL); a one-word answer needs a few tokens, not 256.
DEMO_OPEN_RUN = dataclasses.replace(DEMO_RUN, mode="sample", max_tokens=12)
