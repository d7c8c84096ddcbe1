"""``prefl pairs``: label sampled completions with a reward model, a reward function or a judge.

Every model runs in Lightning's ``predict`` loop, so labelling is data-parallel like training
(``devices``, ``num_nodes``): a reward model through :meth:`prefl.RewardModule.predict_step`
on ``sft`` rows (prompt + completion, read by ``PreferenceDataModule`` exactly as reward
training reads them), a judge through :class:`~prefl.modules.judge.JudgeModule` on ``prompts``
rows (one judge request each, both orders, see :mod:`prefl.data.judging`). Each rank writes its
rows' values with :class:`prefl.RewardWriter`; global rank 0 puts them back in order (the
distributed sampler's padding repeats left out), builds the pairs
(:func:`prefl.data.pairs.choose_pairs`) and writes the pairs file. A reward function
``fn(prompts, completions) -> list[float]`` (the signature PPO takes) runs in this process.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
from lightning.pytorch import LightningModule, Trainer
from transformers import AutoConfig

from prefl.callbacks import RewardWriter
from prefl.data import PreferenceDataModule, load_tokenizer
from prefl.data.judging import JUDGE_LABELS, JUDGE_TEMPLATE, judge_pairs
from prefl.data.pairs import LabelCounts, SampleRow, choose_pairs, pair_row, read_samples
from prefl.data.prompts import encode_prompt_list
from prefl.data.tokenizers import gguf_source
from prefl.generation.rewards import resolve_reward_fn
from prefl.models import CausalLMSpec
from prefl.models.reward import _is_reward_checkpoint
from prefl.modules import RewardModule
from prefl.modules.judge import JudgeModule


def predict_values(
    module: LightningModule,
    rows: list[dict[str, Any]],
    tokenizer: str,
    mode: str,
    key: str,
    scratch: Path,
    trainer_kwargs: dict[str, Any],
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[float] | None:
    """One number per row of ``rows`` (``module.predict_step``'s ``key``), in order.

    Args:
        module: A module whose ``predict_step`` returns ``{key: [one float per row]}``.
        rows: Raw rows for ``PreferenceDataModule(mode=mode)`` (their ``test`` split).
        tokenizer: The module's tokenizer (its path).
        mode: ``sft`` (prompt + completion) or ``prompts``.
        key: The prediction's key.
        scratch: Where the ranks write their values (removed after).
        trainer_kwargs: ``Trainer`` settings (accelerator, devices, precision, ...).
        batch_size: Rows per batch and device.
        max_length: Most tokens per row (prompts are cut from the left to half of it,
            completions from the right; counted); None = the model's context, at most 1024.

    Returns:
        The values on global rank 0; None on the other ranks.
    """
    if max_length is None:
        max_length = min(1024, _positions(tokenizer))
    dm = PreferenceDataModule(
        dataset=datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}),
        tokenizer=tokenizer,
        mode=mode,
        val_split=None,
        max_length=max_length,
        max_prompt_length=None if mode == "prompts" else max_length // 2,
        batch_size=batch_size,
    )
    settings = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    settings["default_root_dir"] = str(scratch.parent)
    trainer = Trainer(**{**settings, **trainer_kwargs}, callbacks=[RewardWriter(str(scratch))])
    trainer.predict(module, datamodule=dm, return_predictions=False)
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return None
    values: dict[int, float] = {}
    for path in [scratch, *scratch.parent.glob(f"{scratch.name}.rank*")]:
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record["index"] < len(rows):  # not a padding repeat
                    values[record["index"]] = record[key]
            path.unlink()
    if len(values) != len(rows) or dm.stats["test"]["used"] != len(rows):
        raise RuntimeError(f"predict gave {len(values)} values for {len(rows)} rows")
    if dm.stats["test"]["truncated"]:
        print(
            f"prefl pairs: {dm.stats['test']['truncated']} of {len(rows)} texts were cut to "
            f"--max-length {max_length} tokens to be scored"
        )
    return [values[i] for i in range(len(rows))]


def _positions(path: str) -> int:
    """The context length (``max_position_embeddings``) of the checkpoint at ``path``."""
    source, gguf_file = gguf_source(path)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(config, "max_position_embeddings", None) or 1024)


def reward_model_scores(
    rows: Sequence[SampleRow], path: str, scratch: Path, **kwargs: Any
) -> list[list[float]] | None:
    """Each completion's reward from a one-label sequence classifier (a prefl reward-model
    export or any such checkpoint), through :class:`~prefl.RewardModule`'s ``predict_step``;
    ``kwargs`` go to :func:`predict_values`."""
    if not _is_reward_checkpoint(CausalLMSpec(name_or_path=path)):
        raise ValueError(
            f"--reward-model {path!r} is not a sequence classifier with one label (a reward "
            "model): a causal LM would get an untrained score head"
        )
    flat = []
    for row in rows:
        for c in row.completions:
            reply = [{"role": "assistant", "content": c}] if row.chat else c
            flat.append({"prompt": row.prompt, "completion": reply})
    module = RewardModule(path, tokenizer=path)
    values = predict_values(module, flat, path, "sft", "reward", scratch, **kwargs)
    return None if values is None else _regroup(rows, values)


def reward_fn_scores(
    rows: Sequence[SampleRow], name: str, tokenizer: str | None = None
) -> list[list[float]]:
    """Each completion's score from a reward function (``"toy"`` or ``"module:function"``),
    given the prompts as PPO gives them: a text as it is, a conversation rendered by
    ``tokenizer``'s chat template (default: the samples' ``meta["model"]``)."""
    fn = resolve_reward_fn(name)
    prompts: list[str] = [row.prompt for row in rows]  # type: ignore[misc]
    if rows and rows[0].chat:
        source = tokenizer or rows[0].meta.get("model")
        if not isinstance(source, str):
            raise ValueError("chat prompts: --reward-fn needs --tokenizer to render them")
        prompts = encode_prompt_list(load_tokenizer(source), prompts)[0]
    flat_prompts = [p for p, row in zip(prompts, rows, strict=True) for _ in row.completions]
    flat = [c for row in rows for c in row.completions]
    values = list(fn(flat_prompts, flat))
    if len(values) != len(flat) or not all(math.isfinite(float(v)) for v in values):
        raise ValueError(
            f"reward function {name!r} gave {len(values)} scores for {len(flat)} completions"
            " (expected one finite number each)"
        )
    return _regroup(rows, [float(v) for v in values])


def _regroup(rows: Sequence[SampleRow], flat: list[float]) -> list[list[float]]:
    out, start = [], 0
    for row in rows:
        out.append(flat[start : start + len(row.completions)])
        start += len(row.completions)
    return out


def judge_asker(
    path: str, scratch: Path, labels: tuple[str, str] = JUDGE_LABELS, **kwargs: Any
) -> Callable[[list[list[dict[str, str]]]], list[float] | None]:
    """The judge at ``path`` as :data:`prefl.data.judging.Ask`: its ``p_first`` per request,
    through :class:`~prefl.modules.judge.JudgeModule`'s ``predict_step`` (``kwargs`` go to
    :func:`predict_values`)."""

    def ask(requests: list[list[dict[str, str]]]) -> list[float] | None:
        module = JudgeModule(path, tokenizer=path, labels=labels)
        rows = [{"prompt": r} for r in requests]
        return predict_values(module, rows, path, "prompts", "p_first", scratch, **kwargs)

    return ask


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON Lines, all or nothing (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def make_pairs(
    samples: Sequence[str],
    out: str,
    reward_model: str | None = None,
    reward_fn: str | None = None,
    judge: str | None = None,
    min_margin: float | None = None,
    judge_template: str = JUDGE_TEMPLATE,
    judge_labels: tuple[str, str] = JUDGE_LABELS,
    tokenizer: str | None = None,
    scores_out: str | None = None,
    **predict: Any,
) -> LabelCounts | None:
    """Label the samples and write the pairs (``prefl pairs``); exactly one labeller.

    Args:
        samples: Samples files or folders (:func:`prefl.data.pairs.read_samples`).
        out: The pairs file (JSON Lines), written whole at the end.
        reward_model: A reward-model export or one-label sequence-classifier checkpoint.
        reward_fn: A reward function, ``"toy"`` or ``"module:function"``.
        judge: A chat model (directory or ``.gguf``) judging pairs in both orders.
        min_margin: None = best against worst; else every pair with at least this margin.
        judge_template: The judge's instructions (``{prompt}``, ``{first}``, ``{second}``).
        judge_labels: The labels the template asks the judge to answer with.
        tokenizer: Renders chat prompts for a reward function (default: samples' meta model).
        scores_out: Also write the samples with each completion's ``scores`` here (scores
            from a reward model or function: ``prefl label`` asks about close pairs first).
        **predict: ``batch_size``, ``max_length`` and ``trainer_kwargs`` of the predict loop.

    Returns:
        The counts (also printed as one line) on global rank 0; None on other ranks.
    """
    if sum(x is not None for x in (reward_model, reward_fn, judge)) != 1:
        raise ValueError("give exactly one of --reward-model, --reward-fn and --judge")
    if min_margin is not None and min_margin < 0:
        raise ValueError(f"--min-margin must be >= 0, got {min_margin}")
    counts = LabelCounts()
    rows = read_samples(samples, counts)
    scratch = Path(f"{out}.predict.jsonl")
    if judge is not None:
        ask = judge_asker(judge, scratch, judge_labels, **predict)
        chosen = judge_pairs(rows, ask, counts, judge_template, min_margin)
        source = f"judge:{judge}"
        if chosen is None:
            return None
    else:
        if reward_model is not None:
            scores = reward_model_scores(rows, reward_model, scratch, **predict) if rows else []
            source = f"reward-model:{reward_model}"
        else:
            scores = reward_fn_scores(rows, reward_fn, tokenizer)
            source = f"reward-fn:{reward_fn}"
        if scores is None:
            return None
        chosen = [
            choose_pairs(row.completions, s, counts, min_margin=min_margin)
            for row, s in zip(rows, scores, strict=True)
        ]
        if scores_out is not None:
            write_jsonl(
                Path(scores_out), [_scored(row, s) for row, s in zip(rows, scores, strict=True)]
            )
    pairs = [
        pair_row(
            row.prompt,
            row.completions[c],
            row.completions[r],
            m,
            source,
            id=row.comparison_id(c, r),
        )
        for row, found in zip(rows, chosen, strict=True)
        for c, r, m in found
    ]
    counts.pairs = len(pairs)
    write_jsonl(Path(out), pairs)
    print(counts.line() + f" -> {out}", flush=True)
    return counts


def _scored(row: SampleRow, scores: list[float]) -> dict[str, Any]:
    """A samples row with its (non-blank) completions' scores, keeping its key as ``id``."""
    out = {"id": row.key, "prompt": row.prompt, "completions": row.completions}
    return {**out, "scores": scores, "meta": row.meta}
