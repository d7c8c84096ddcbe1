"""Sampling completions from a causal LM: left-padded prompts, KV cache, EOS truncation.

:func:`sample_completions` (evaluation) and :func:`prefl.generation.rollout.sample_responses` (the
PPO
rollout) both sample through :func:`generate_sampled`, and so through one generation config,
:func:`sampling_config`: pure ancestral sampling from ``softmax(logits / temperature)`` of the
model, whatever the checkpoint's own ``generation_config`` (``generation_config.json``) says.
No top-k / top-p / min-p / typical filtering, no repetition or n-gram penalty, no minimum length,
no suppressed, forced or biased tokens, no beams, no watermark.

``top_p`` (nucleus sampling) is the one filter :func:`sampling_config` offers, off by default
(``top_p=1.0``), and only :class:`prefl.SampleModule` (making datasets of answers) turns it on.
Reinforcement learning keeps it off on purpose: PPO's ratio and KL and online DPO's log-probs
score each sampled token under the full ``softmax(logits / T)`` of the policy; samples drawn
from a truncated distribution would make those numbers refer to a distribution nobody sampled
from (and a token outside the nucleus could never be drawn, however the policy moves).

Prompts are left-padded (so every row's last prompt token sits at the same position and
``generate`` uses the KV cache), everything after the first EOS is padding, and the RNG is seeded
without disturbing the global one. (:mod:`prefl.generation.seeded` draws each row from a
generator of its own instead, for samples that do not depend on their batch.)

Passing a fresh ``GenerationConfig`` is not enough on its own: ``generate`` (transformers 5)
fills every field the passed config leaves at ``None`` from ``model.generation_config``, and
several processors (``suppress_tokens``, ``bad_words_ids``, ``sequence_bias``, ``min_p``,
``forced_eos_token_id``...) are off only when ``None``. :func:`isolated_generation_config`
therefore swaps the model's own generation config for a bare one for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from prefl.data.collate import pad
from prefl.data.prompts import Prompt, encode_prompt_list
from prefl.functional.selected import masked_sequence_logps
from prefl.models.sharding import gathered_params


@dataclass
class Samples:
    """Completions sampled for a list of prompts (one entry per prompt and sample).

    Attributes:
        prompts: The prompt text of each completion (a conversation as its rendered chat text).
        completions: The decoded completion texts (special tokens removed).
        ended: Whether each completion emitted EOS before ``max_new_tokens`` ran out.
        lengths: Completion lengths in tokens, EOS included.
        prompt_ids: Token ids of each prompt (with the BOS that the tokenizer or template writes).
        completion_ids: Token ids of each completion, up to and including the first EOS.
    """

    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)


def completion_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``(B, T)`` mask, 1 on tokens up to and including the first EOS of each row, 0 after.

    Args:
        ids: ``(B, T)`` generated token ids (the completion part only).
        eos_id: The EOS id.
    """
    is_eos = (ids == eos_id).long()
    before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before each position
    return (before == 0).long()


#: Every logits processor and decoding option of ``generate`` at its "off" value; those that are
#: off only at ``None`` (``min_new_tokens``, ``min_p``, ``suppress_tokens``, ``bad_words_ids``,
#: ``sequence_bias``, ``forced_*_token_id``, watermarking...) are kept out of reach by
#: :func:`isolated_generation_config` (``min_length=0`` alone: setting both warns).
_NEUTRAL: dict[str, Any] = {
    "top_k": 0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "num_return_sequences": 1,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
}


def sampling_config(
    temperature: float,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
    *,
    top_p: float = 1.0,
    with_scores: bool = False,
) -> GenerationConfig:
    """The complete generation config of every prefl sampler: ``do_sample`` from
    ``softmax(logits / temperature)`` with the KV cache, every other processor off.

    Use it with :func:`generate_with` (which keeps the model's own generation config out).

    Args:
        temperature: Sampling temperature (> 0).
        max_new_tokens: Most new tokens per row.
        pad_token_id: Written after a row's EOS.
        eos_token_id: Ends a row.
        top_p: Nucleus sampling: draw from the smallest set of most likely tokens whose
            probability (after the temperature) reaches ``top_p``, renormalised. 1.0 = off,
            the default, and what reinforcement learning keeps (see the module docstring).
        with_scores: Also return, per step, the processed scores (``logits / temperature``)
            and the raw logits (``return_dict_in_generate``); this changes no sample.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    outputs = {"output_scores": True, "output_logits": True} if with_scores else {}
    return GenerationConfig(
        do_sample=True,
        temperature=float(temperature),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        use_cache=True,
        return_dict_in_generate=with_scores,
        **{**_NEUTRAL, "top_p": float(top_p)},
        **outputs,
    )


@contextmanager
def isolated_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """For the duration, every ``generation_config`` that ``model`` or its submodules own (the
    Hugging Face model inside a ``peft`` or FSDP wrapper included) is a bare
    ``GenerationConfig()``, so ``generate`` cannot merge the checkpoint's settings into the one
    it is given; the original objects are put back afterwards, also on error."""
    saved = [
        (m, cfg)
        for m in model.modules()
        if isinstance(cfg := vars(m).get("generation_config"), GenerationConfig)
    ]
    try:
        for m, _ in saved:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, cfg in saved:
            m.generation_config = cfg


@torch.no_grad()
def generate_with(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate`` under ``config`` alone (see :func:`isolated_generation_config`); the
    output is ``generate``'s (a tensor, or a ``GenerateOutput`` with ``with_scores``).

    A sharded model (FSDP2, FSDP1, ZeRO-3) is gathered once for the whole call
    (:func:`prefl.models.sharding.gathered_params`): ranks that stop at different lengths then
    issue no mismatched collectives. That makes it a collective: every rank must call it.
    ``generate_kwargs`` go to ``generate`` as they are (``logits_processor``,
    ``cache``: see :mod:`prefl.generation.seeded`)."""
    with gathered_params(model), isolated_generation_config(model):
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            **generate_kwargs,
        )


@torch.no_grad()
def generate_sampled(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    eos_token_id: int,
) -> torch.Tensor:
    """The new tokens ``(B, R)`` that ``generate`` samples after left-padded ``input_ids``
    ``(B, P)``, from the current global RNG (callers seed it).

    Every step samples from exactly ``softmax(logits / temperature)`` of ``model``
    (:func:`sampling_config`), whatever its checkpoint's ``generation_config`` holds: that is
    the distribution PPO's log-probs (:func:`prefl.generation.rollout.response_logprobs`) score. A
    collective for a sharded model (:func:`generate_with`)."""
    config = sampling_config(temperature, max_new_tokens, pad_token_id, eos_token_id)
    out = generate_with(model, input_ids, attention_mask, config)
    return out[:, input_ids.shape[1] :]


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    temperature: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 64,
    seed: int = 0,
) -> Samples:
    """Sample ``num_samples`` completions for each prompt, from ``softmax(logits / T)``.

    Args:
        model: A Hugging Face causal LM (eval mode is set for the call and restored after).
        tokenizer: Its tokenizer (PAD distinct from EOS).
        prompts: Prompt texts, tokenized as data rows' prompts are (BOS, then the text as text:
            special-token strings stay text), or conversations (message lists, rendered by the
            chat template with its generation prompt); see
            :func:`prefl.data.prompts.encode_prompt_list`. ``Samples.prompts`` holds each as a
            text (a conversation as its rendered chat text).
        max_new_tokens: Most tokens per completion.
        temperature: Sampling temperature (> 0). Samples come from exactly
            ``softmax(logits / temperature)`` (no top-k / top-p or other processor, whatever
            the checkpoint's ``generation_config`` says; see :func:`sampling_config`).
        num_samples: Completions per prompt.
        batch_size: Prompts per ``generate`` call.
        seed: Seed of the sampling RNG (the global RNG state is restored afterwards).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    expanded = [p for p in prompts for _ in range(num_samples)]
    out = Samples()
    eos = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(expanded), batch_size):
            chunk = expanded[start : start + batch_size]
            texts, ids = encode_prompt_list(tokenizer, chunk)  # special strings stay text
            length = max(len(i) for i in ids)
            input_ids = pad(ids, tokenizer.pad_token_id, length, left=True).to(device)
            attention = pad([[1] * len(i) for i in ids], 0, length, left=True).to(device)
            generated = generate_sampled(
                model,
                input_ids,
                attention,
                max_new_tokens,
                temperature,
                tokenizer.pad_token_id,
                eos,
            )
            mask = completion_mask(generated, eos)
            for i, (row, row_mask) in enumerate(zip(generated, mask, strict=True)):
                n = int(row_mask.sum())
                tokens = row[:n].tolist()
                out.prompts.append(texts[i])
                out.prompt_ids.append(ids[i])
                out.completion_ids.append(tokens)
                out.completions.append(tokenizer.decode(tokens, skip_special_tokens=True))
                out.ended.append(bool(tokens) and tokens[-1] == eos)
                out.lengths.append(n)
    model.train(was_training)
    return out


@torch.no_grad()
def score_samples(
    model: torch.nn.Module, samples: Samples, pad_token_id: int, batch_size: int = 64
) -> torch.Tensor:
    """Log-probability ``(N,)`` of each sampled completion (EOS included) under ``model``.

    With the policy and its reference, ``score(policy) - score(reference)`` on the policy's own
    samples is a per-sample estimate of the sequence-level KL(policy || reference).

    Args:
        model: A causal LM (eval mode for the call, restored after).
        samples: Output of :func:`sample_completions` (prompt and completion ids are used).
        pad_token_id: The PAD id; batches are right-padded.
        batch_size: Sequences per forward.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(samples.completion_ids), batch_size):
        prompts = samples.prompt_ids[start : start + batch_size]
        completions = samples.completion_ids[start : start + batch_size]
        seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
        length = max(len(s) for s in seqs)
        ids = pad(seqs, pad_token_id, length).to(device)
        attention = pad([[1] * len(s) for s in seqs], 0, length).to(device)
        loss_mask = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions, strict=True)]
        sums, _ = masked_sequence_logps(model, ids, attention, pad(loss_mask, 0, length).to(device))
        out.append(sums.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
