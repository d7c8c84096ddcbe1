"""The toy task: a miniature of the DPO paper's IMDb controlled-sentiment experiment.

Everything here is deterministic for a given seed and needs no download, so that every stage of
prefl (SFT, reward model, DPO, PPO, evaluation) can run offline on a laptop CPU and be *measured*
against a known ground truth.

- A **prompt** opens a short review: ``"<opener> , the <subject> <verb>"``. The opener sets the
  review's mood (``happily`` leans positive, ``sadly`` negative, ``honestly`` neutral).
- The **generator** (the reference distribution the SFT corpus is drawn from) writes a completion
  of ``MIN_WORDS..MAX_WORDS`` words (uniform length), each drawn i.i.d. from the lexicon with
  category probabilities that depend on the prompt's mood. Because it is this simple, the exact
  probability of any completion is known (:func:`generator_logprob`).
- The **oracle reward** (:func:`oracle_reward`) is positive minus negative words over the number of
  words, in ``[-1, 1]``: it stands in for the human labeller.

From these come the SFT corpus (``prompt``/``completion``), preference pairs labelled by the
oracle (``prompt``/``chosen``/``rejected``) and held-out prompts. Prompts are split once into
train and held-out sets, so evaluation prompts are never seen in training.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

# fmt: off
POSITIVE: tuple[str, ...] = (
    "great", "good", "wonderful", "brilliant", "fun", "moving",
    "superb", "charming", "delightful", "fresh",
)
NEGATIVE: tuple[str, ...] = (
    "bad", "boring", "awful", "dull", "weak", "terrible", "messy",
    "bland", "tedious", "clumsy", "poor", "flat",
)
NEUTRAL: tuple[str, ...] = (
    "and", "very", "quite", "the", "story", "scenes", "really", "a", "bit",
    "mostly", "also", "long", "with", "some", "moments", "at", "times", "then",
)
OPENERS: dict[str, str] = {
    "happily": "positive", "luckily": "positive", "gladly": "positive",
    "sadly": "negative", "alas": "negative", "regrettably": "negative",
    "honestly": "neutral", "frankly": "neutral", "overall": "neutral",
}
SUBJECTS: tuple[str, ...] = (
    "movie", "film", "plot", "acting", "ending", "soundtrack", "script", "cast",
)
VERBS: tuple[str, ...] = ("was", "is", "felt", "seemed")
# fmt: on
PUNCTUATION: tuple[str, ...] = (",", ".")

#: Probability of a (positive, negative, neutral) word for each mood of the prompt.
MOOD_PROBS: dict[str, tuple[float, float, float]] = {
    "positive": (0.50, 0.10, 0.40),
    "negative": (0.20, 0.40, 0.40),
    "neutral": (0.35, 0.20, 0.45),
}
MIN_WORDS = 3
MAX_WORDS = 10
HELD_OUT_FRACTION = 0.25
_CATEGORIES = (POSITIVE, NEGATIVE, NEUTRAL)
_POSITIVE_SET = frozenset(POSITIVE)
_NEGATIVE_SET = frozenset(NEGATIVE)


def vocabulary() -> list[str]:
    """Return every word the toy task can produce, in a fixed order (no set ordering)."""
    words = [*OPENERS, *SUBJECTS, *VERBS, *PUNCTUATION, *POSITIVE, *NEGATIVE, *NEUTRAL]
    seen: dict[str, None] = {}
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


def all_prompts() -> list[str]:
    """Return every toy prompt, in a fixed order."""
    return [f"{o} , the {s} {v}" for o in OPENERS for s in SUBJECTS for v in VERBS]


def split_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """Split the prompts once into (train, held-out) lists, seeded, stratified by opener.

    Args:
        seed: Seed of the split; the default split is the one every stage uses.
    """
    rng = random.Random(f"toy-split-{seed}")
    train, held_out = [], []
    per_opener = len(SUBJECTS) * len(VERBS)
    prompts = all_prompts()
    for start in range(0, len(prompts), per_opener):
        group = prompts[start : start + per_opener]
        rng.shuffle(group)
        n_held = round(len(group) * HELD_OUT_FRACTION)
        held_out += group[:n_held]
        train += group[n_held:]
    return train, held_out


def prompt_mood(prompt: str) -> str:
    """Return the mood (``positive``/``negative``/``neutral``) set by a toy prompt's opener."""
    opener = prompt.split(" ", 1)[0]
    if opener not in OPENERS:
        raise ValueError(f"not a toy prompt (unknown opener {opener!r}): {prompt!r}")
    return OPENERS[opener]


def oracle_reward(prompt: str, completion: str) -> float:
    """The toy task's true reward: (positive words - negative words) / number of words.

    Args:
        prompt: The prompt (unused: the oracle judges the completion's sentiment alone, like the
            IMDb sentiment classifier of the DPO paper).
        completion: The completion text; words are separated by whitespace. An empty completion
            scores 0.

    Returns:
        A float in ``[-1, 1]``.
    """
    del prompt
    words = completion.split()
    if not words:
        return 0.0
    pos = sum(w in _POSITIVE_SET for w in words)
    neg = sum(w in _NEGATIVE_SET for w in words)
    return (pos - neg) / len(words)


def oracle_rewards(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Batch form of :func:`oracle_reward`: ``fn(prompts, completions) -> list[float]``."""
    return [oracle_reward(p, c) for p, c in zip(prompts, completions, strict=True)]


def sample_completion(prompt: str, rng: random.Random) -> str:
    """Draw one completion for ``prompt`` from the generator (the reference distribution)."""
    probs = MOOD_PROBS[prompt_mood(prompt)]
    n_words = rng.randint(MIN_WORDS, MAX_WORDS)
    words = []
    for _ in range(n_words):
        category = rng.choices(_CATEGORIES, weights=probs)[0]
        words.append(rng.choice(category))
    return " ".join(words)


def generator_logprob(prompt: str, completion: str) -> float:
    """Exact log-probability of ``completion`` under the generator given ``prompt``.

    Returns ``-inf`` for completions the generator cannot produce.
    """
    probs = MOOD_PROBS[prompt_mood(prompt)]
    words = completion.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return -math.inf
    total = -math.log(MAX_WORDS - MIN_WORDS + 1)
    for word in words:
        for category, p in zip(_CATEGORIES, probs, strict=True):
            if word in category:
                total += math.log(p / len(category))
                break
        else:
            return -math.inf
    return total


def sft_rows(n: int, seed: int = 0, held_out: bool = False) -> list[dict[str, str]]:
    """SFT corpus rows ``{"prompt", "completion"}`` drawn from the generator.

    Args:
        n: Number of rows.
        seed: Seed of the draw.
        held_out: Draw prompts from the held-out prompts instead of the training prompts.
    """
    rng = random.Random(f"toy-sft-{seed}-{held_out}")
    prompts = split_prompts()[1 if held_out else 0]
    rows = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        rows.append({"prompt": prompt, "completion": sample_completion(prompt, rng)})
    return rows


def pair_rows(n: int, seed: int = 0, held_out: bool = False) -> list[dict[str, str]]:
    """Preference rows ``{"prompt", "chosen", "rejected"}``: two generator samples, the one with
    the higher oracle reward chosen (ties are re-drawn).

    Args:
        n: Number of rows.
        seed: Seed of the draw.
        held_out: Draw prompts from the held-out prompts instead of the training prompts.
    """
    rng = random.Random(f"toy-pairs-{seed}-{held_out}")
    prompts = split_prompts()[1 if held_out else 0]
    rows = []
    while len(rows) < n:
        prompt = rng.choice(prompts)
        a, b = sample_completion(prompt, rng), sample_completion(prompt, rng)
        ra, rb = oracle_reward(prompt, a), oracle_reward(prompt, b)
        if ra == rb:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(n: int | None = None, seed: int = 0, held_out: bool = False) -> list[dict]:
    """Prompt rows ``{"prompt"}`` for PPO or evaluation.

    Args:
        n: Number of rows, drawn with replacement; ``None`` returns each prompt of the set once.
        seed: Seed of the draw.
        held_out: Use the held-out prompts instead of the training prompts.
    """
    prompts = split_prompts()[1 if held_out else 0]
    if n is None:
        return [{"prompt": p} for p in prompts]
    rng = random.Random(f"toy-prompts-{seed}-{held_out}")
    return [{"prompt": rng.choice(prompts)} for _ in range(n)]


#: Row generators by data-module mode.
ROWS_BY_MODE = {"sft": sft_rows, "pairs": pair_rows, "prompts": prompt_rows}
#: Default number of rows per split, by mode.
TOY_SIZES: dict[str, dict[str, int]] = {
    "sft": {"train": 4000, "validation": 256, "test": 256},
    "pairs": {"train": 4000, "validation": 256, "test": 256},
    "prompts": {"train": 2048, "validation": 128, "test": 128},
}


def toy_splits(mode: str, seed: int = 0) -> dict[str, list[dict]]:
    """Rows of every split for a data-module ``mode`` (``sft``, ``pairs`` or ``prompts``).

    Train rows use the training prompts; validation and test rows use held-out prompts (drawn
    with different seeds, so the two never share rows).
    """
    if mode not in ROWS_BY_MODE:
        raise ValueError(f"unknown toy mode {mode!r}; expected one of {sorted(ROWS_BY_MODE)}")
    make, sizes = ROWS_BY_MODE[mode], TOY_SIZES[mode]
    return {
        "train": make(sizes["train"], seed=seed),
        "validation": make(sizes["validation"], seed=seed + 1, held_out=True),
        "test": make(sizes["test"], seed=seed + 2, held_out=True),
    }


def corpus_reward(rows: Sequence[dict[str, str]]) -> float:
    """Mean oracle reward of SFT rows (``prompt``/``completion``)."""
    return sum(oracle_reward(r["prompt"], r["completion"]) for r in rows) / len(rows)


def export_jsonl(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write every toy split of every mode as JSONL (``<mode>_<split>.jsonl``) so users see the
    formats; returns the written paths. ``python -m prefl.tasks.toy DIR`` does this.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for mode in ROWS_BY_MODE:
        for split, rows in toy_splits(mode, seed).items():
            path = out / f"{mode}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m prefl.tasks.toy OUT_DIR")
    for written in export_jsonl(sys.argv[1]):
        print(written)
