"""PPO rollouts: sample responses, then score them in the same numerics as the update.

The steps follow the checklist of design §5:

1. prompts arrive left-padded; each is repeated ``k`` times and sampled with the KV cache through
   ``generate`` from exactly ``softmax(logits / temperature)`` of the policy: prefl's own
   generation config (:func:`prefl.generation.sampling_config`), never the checkpoint's, so no
   top-k / top-p, repetition penalty, minimum length, suppressed tokens etc. (which would make
   the PPO ratio and the KL refer to a distribution nobody sampled from), under a seed derived
   from (run seed, step, rank) so ranks differ and a resumed run samples the same responses;
2. everything after the first EOS becomes PAD, and ``response_mask`` covers the tokens up to and
   including it (§5.4);
3. policy, reference and value forwards run on the same ``[prompt | response]`` sequence with
   position ids that follow the attention mask (§5.1), and every log-prob divides the logits by
   the sampling temperature (§5.2);
4. per-token rewards are ``-β · KL_t`` with the scalar score added on the last valid token
   (:func:`token_rewards`, §5.6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefl.functional import entropy_from_logits, token_logps
from prefl.generation.sample import completion_mask, generate_sampled


@dataclass
class Responses:
    """Sampled responses, ``N = prompts × k`` rows in ``repeat_interleave`` order.

    Attributes:
        query_ids: ``(N, P)`` prompt ids, left-padded.
        query_mask: ``(N, P)``, 1 on real prompt tokens.
        response_ids: ``(N, R)`` response ids, PAD after the first EOS.
        response_mask: ``(N, R)``, 1 on response tokens up to and including the first EOS.
        ended: ``(N,)`` bool, whether the response emitted EOS.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor

    def sequence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, position_ids)`` of ``[prompt | response]``: ``(N, P+R)``.

        Position ids follow the attention mask, so left padding does not shift positions.
        """
        ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0)

    def select(self, index: torch.Tensor) -> Responses:
        """The rows ``index`` (a minibatch)."""
        return Responses(
            *(
                t[index]
                for t in (
                    self.query_ids,
                    self.query_mask,
                    self.response_ids,
                    self.response_mask,
                    self.ended,
                )
            )
        )


@torch.no_grad()
def sample_responses(
    policy: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
) -> Responses:
    """Sample ``k`` responses per left-padded prompt ``(B, P)`` with the KV cache.

    Every token is drawn from exactly ``softmax(logits / temperature)`` of ``policy``, whatever
    its checkpoint's ``generation_config`` says (:func:`prefl.generation.generate_sampled`):
    the distribution whose log-probs :func:`response_logprobs` computes at the same temperature.
    The global RNG is left as it was; ``seed`` alone decides the samples.
    """
    query_ids = prompt_ids.repeat_interleave(k, dim=0)
    query_mask = prompt_mask.repeat_interleave(k, dim=0)
    was_training = policy.training
    policy.eval()
    device = query_ids.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        response = generate_sampled(
            policy, query_ids, query_mask, max_new_tokens, temperature, pad_token_id, eos_token_id
        )
    policy.train(was_training)
    mask = completion_mask(response, eos_token_id)
    response = response.masked_fill(mask == 0, pad_token_id)
    ended = ((response == eos_token_id) & (mask == 1)).any(-1)
    return Responses(query_ids, query_mask, response, mask, ended)


def response_logprobs(
    model: torch.nn.Module, responses: Responses, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(N, R)`` of the responses under ``model``: ``log_softmax`` of the
    full, unfiltered ``logits / temperature`` (the distribution :func:`sample_responses` samples
    from), 0 on padding; with ``with_entropy``, also the per-token entropy ``(N, R)``."""
    ids, mask, positions = responses.sequence()
    r = responses.response_ids.shape[1]
    # only the R positions that predict response tokens go through the LM head (the prompt's
    # logits are never used): the last R + 1 positions, minus the very last
    logits = _response_logits(model, ids, mask, positions, r)
    if temperature != 1.0:
        logits = logits / temperature
    logps = token_logps(logits, responses.response_ids, responses.response_mask)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    return logps, entropy


def _response_logits(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    r: int,
) -> torch.Tensor:
    """Logits ``(N, R, V)`` at the positions that predict the ``R`` response tokens, asking the
    model for its last ``R + 1`` positions only (``logits_to_keep``; no KV cache); models
    without ``logits_to_keep`` compute them all and are sliced."""
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    try:
        logits = model(**kwargs, use_cache=False, logits_to_keep=r + 1).logits
    except TypeError:  # a model whose forward has no logits_to_keep
        logits = model(**kwargs).logits
    return logits[:, -(r + 1) : -1]


def response_values(value_model: torch.nn.Module, responses: Responses) -> torch.Tensor:
    """Values ``(N, R)``: ``V`` of the state before each response token, 0 on padding."""
    ids, mask, positions = responses.sequence()
    p, r = responses.query_ids.shape[1], responses.response_ids.shape[1]
    values = value_model(ids, mask, positions)[:, p - 1 : p - 1 + r]
    return values * responses.response_mask


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards ``(N, R)``: ``-kl_coef · kl`` on valid tokens, plus ``scores`` ``(N,)`` on
    each row's last valid token (design §5.6); 0 on padding."""
    rewards = -kl_coef * kl * mask
    last = (mask.long().cumsum(-1) * mask).argmax(-1)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards
