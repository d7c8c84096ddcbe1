"""Unpaired feedback for KTO: one completion per row with a desirable / undesirable label.

``PreferenceDataModule(mode="unpaired")`` reads rows of ``prompt`` + ``completion`` + boolean
``label`` in every row format the data module reads (a conversational ``completion`` is a message
list), or paired data read as unpaired, as TRL does: each pair gives a desirable row (its chosen
completion) and an undesirable one (its rejected completion), in that order.

KTO's reference point is the policy's KL to the reference, estimated on *mismatched* (prompt,
completion) pairs. Each row gets its mismatched completion once, when the split is built
(:func:`add_mismatched`): the completion of the row half the split away, or the next one after it
whose prompt differs. Fixing it per row (not per batch) makes it independent of shuffling,
batching and data-parallel sharding, and lets the reference's log-probs of it be precomputed like
the row's own.
"""

from __future__ import annotations

from typing import Any

import datasets

#: What an unpaired row holds after tokenization (besides the accounting columns).
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label", "kl_completion_ids")


def explode_pairs(batch: dict[str, list]) -> dict[str, list]:
    """Tokenized pairs (a batched ``Dataset.map``) as unpaired rows: chosen (``label`` True) then
    rejected (False) of each pair, the other columns repeated."""
    out: dict[str, list] = {k: [] for k in batch if k not in ("chosen_ids", "rejected_ids")}
    out["completion_ids"], out["label"] = [], []
    for i in range(len(batch["prompt_ids"])):
        for key, label in (("chosen_ids", True), ("rejected_ids", False)):
            for name in out:
                if name not in ("completion_ids", "label"):
                    out[name].append(batch[name][i])
            out["completion_ids"].append(batch[key][i])
            out["label"].append(label)
    return out


def mismatched_rows(prompts: list[list[int]]) -> list[int]:
    """For each row ``i``, the row whose completion is its mismatched one: ``(i + N // 2) % N``,
    or the first row after that whose prompt differs from row ``i``'s (``i`` itself only when
    every prompt is the same)."""
    n = len(prompts)
    out = []
    for i in range(n):
        j = (i + n // 2) % n
        for _ in range(n):
            if prompts[j] != prompts[i]:
                break
            j = (j + 1) % n
        out.append(j)
    return out


def add_mismatched(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """``ds`` with ``kl_completion_ids``: each row's mismatched completion
    (:func:`mismatched_rows`), cut from the right so that prompt + it fits ``max_length``."""
    if len(ds) == 0:
        return ds.add_column("kl_completion_ids", [])
    prompts, completions = ds["prompt_ids"], ds["completion_ids"]
    partner = mismatched_rows(prompts)
    kl = [completions[j][: max(max_length - len(prompts[i]), 0)] for i, j in enumerate(partner)]
    return ds.add_column("kl_completion_ids", kl)


def label_counts(ds: datasets.Dataset) -> dict[str, Any]:
    """``{"desirable": n, "undesirable": m}`` of an unpaired split."""
    labels = ds["label"]
    desirable = sum(bool(x) for x in labels)
    return {"desirable": desirable, "undesirable": len(labels) - desirable}
