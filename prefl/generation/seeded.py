"""Sampling in which each row's draws depend on that row's own seed alone, never on its batch.

``generate`` draws every step's tokens for the whole batch from one random stream
(``torch.multinomial``), so a prompt's samples change with the prompts it happens to share a
batch with, with the batch size and with the data-parallel rank it lands on. To make a dataset
of answers (:class:`prefl.SampleModule`) that is the same on 1 or 8 ranks and resumable at any
prompt, each row ``i`` gets its own ``torch.Generator`` seeded with ``seeds[i]``
(:func:`sample_seed` of the run seed, the prompt's row id and the sample's index), and
:class:`RowDraw` replaces the batch draw:

- the config is :func:`prefl.generation.sampling_config`'s, and the same transformers warpers
  ``generate`` would apply in sampling mode (``TemperatureLogitsWarper``, ``TopPLogitsWarper``)
  shape the scores: the distribution is exactly the sampler's ``softmax(logits / T)`` (within
  the ``top_p`` nucleus when one is set);
- :class:`RowDraw` then draws one token per row by inverting that row's cumulative
  distribution at a uniform number from the row's generator (one per step), and leaves only
  that token possible; ``generate`` runs in greedy mode (``do_sample=False``) and so picks it.

The ``t``-th token of row ``i`` is therefore decided by ``seeds[i]``'s ``t``-th uniform and the
model's distribution, whatever else is in the batch (up to float rounding of a padded batch's
logits, which moves a draw only when the uniform falls within about 1e-6 of a boundary between
two tokens).

``repeats`` (``k`` samples of each prompt) computes the prompt's forward once: the prompts, but
for their last token, go through the model, and the KV cache is copied ``k`` times
(``DynamicCache.batch_repeat_interleave``) before ``generate`` continues from it, instead of
running the same prompt ``k`` times. Everything else (left padding, the KV cache, EOS and PAD,
the model's own ``generation_config`` kept out, sharded models gathered) is
:func:`prefl.generation.sample.generate_with`'s.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from prefl.generation.sample import generate_with
from prefl.models.sharding import gathered_params


def sample_seed(seed: int, key: int, index: int) -> int:
    """The seed of sample ``index`` of the prompt ``key`` (its row id) in a run seeded ``seed``:
    a 63-bit hash of the three, the same in every process and on every machine."""
    digest = hashlib.blake2b(f"{seed}/{key}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowDraw(LogitsProcessor):
    """Draw one token per row from ``softmax(scores)`` with the row's own generator, and leave
    only that token possible (0 at it, ``-inf`` elsewhere), for a greedy ``generate`` to pick.

    Args:
        seeds: One seed per row of the batch ``generate`` runs on.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        """``scores`` ``(N, V)`` (after temperature and top-p) to ``(N, V)`` one-hot log-probs."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.generators)} seeds")
        uniform = torch.cat([torch.rand(1, generator=g) for g in self.generators])
        probs = torch.softmax(scores.float(), dim=-1)
        cdf = probs.cumsum(-1)
        target = uniform.to(cdf.device)[:, None] * cdf[:, -1:]
        token = torch.searchsorted(cdf, target, right=True)
        # a target rounded up to the total mass: the last token that can be drawn
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1, keepdim=True)
        token = torch.minimum(token, last)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def seeded_generation(
    config: GenerationConfig, seeds: Sequence[int]
) -> tuple[GenerationConfig, LogitsProcessorList]:
    """The greedy twin of a :func:`~prefl.generation.sampling_config` and the processors that
    make it sample ``config``'s distribution with one generator per row (module docstring).

    Args:
        config: A sampling config (``do_sample``, ``temperature``, optional ``top_p``).
        seeds: One seed per row.
    """
    if not config.do_sample or config.return_dict_in_generate:
        raise ValueError("seeded_generation takes a sampling_config without with_scores")
    processors = LogitsProcessorList()
    if config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_p is not None and config.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    processors.append(RowDraw(seeds))
    greedy = copy.deepcopy(config)
    greedy.do_sample, greedy.temperature, greedy.top_p, greedy.top_k = False, 1.0, 1.0, None
    return greedy, processors


@torch.no_grad()
def shared_prompt_cache(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int
) -> dict[str, Any]:
    """The KV cache of each left-padded prompt ``(B, P)`` but its last token, computed once and
    repeated ``repeats`` times along the batch (``repeat_interleave`` order): ``(B·repeats)``
    rows of ``P - 1`` positions, for ``generate`` to continue from. Positions follow the
    attention mask, as ``generate``'s own do. Returned as the keyword argument of ``generate``
    that takes it (``cache``, ``past_key_values`` before transformers 5.x)."""
    ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with gathered_params(model):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
    new_api = "cache" in getattr(out, "__dataclass_fields__", {})  # transformers >= 5.x
    cache = out.cache if new_api else out.past_key_values
    cache.batch_repeat_interleave(repeats)
    return {"cache" if new_api else "past_key_values": cache}


@torch.no_grad()
def generate_seeded(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    seeds: Sequence[int],
    repeats: int = 1,
) -> torch.Tensor:
    """Sample ``repeats`` continuations of each left-padded prompt ``(B, P)``, row ``j`` of the
    ``(B·repeats)`` output (``repeat_interleave`` order) drawn with ``seeds[j]`` alone.

    Args:
        model: A causal LM (its mode is left as it is: callers put it in eval mode).
        input_ids: ``(B, P)`` prompt ids, left-padded.
        attention_mask: ``(B, P)``, 1 on real prompt tokens.
        config: A :func:`~prefl.generation.sampling_config` (temperature, ``top_p``, length,
            PAD and EOS).
        seeds: ``B·repeats`` seeds, one per output row.
        repeats: Continuations per prompt; the prompt's forward is shared among them.

    Returns:
        ``(B·repeats, R)`` new token ids; after a row's first EOS, PAD (which may be EOS: use
        :func:`~prefl.generation.completion_mask`). A collective for a sharded model.
    """
    if len(seeds) != input_ids.shape[0] * repeats:
        raise ValueError(f"{len(seeds)} seeds for {input_ids.shape[0]} prompts x {repeats}")
    greedy, processors = seeded_generation(config, seeds)
    kwargs: dict[str, Any] = {}
    if repeats > 1 and input_ids.shape[1] > 1:
        kwargs = shared_prompt_cache(model, input_ids, attention_mask, repeats)
    ids = input_ids.repeat_interleave(repeats, dim=0)
    mask = attention_mask.repeat_interleave(repeats, dim=0)
    out = generate_with(model, ids, mask, greedy, logits_processor=processors, **kwargs)
    return out[:, ids.shape[1] :]
