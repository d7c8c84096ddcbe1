"""Torch-only functional helpers shared by the preference-tuning losses and modules.

This package holds the building blocks (``masked``, ``logps`` and ``selected``, ``rl`` and
``advantages``), re-exported here:

* masked reductions (:func:`masked_sum`, :func:`masked_mean`, :func:`masked_var`) used to
  average per-token quantities over the valid (non-padding, non-prompt) positions;
* memory-efficient log-probabilities of given labels under a language model's logits
  (:func:`token_logps`, :func:`sequence_logps`), and their model-level form that runs the LM
  head only on the scored positions (:func:`masked_sequence_logps`, :func:`scored_tokens`);
* per-token reinforcement-learning helpers for PPO-style training: :func:`whiten`,
  generalised advantage estimation (:func:`gae`), KL estimators (:func:`kl_penalty`), a chunked
  :func:`entropy_from_logits` and the :func:`explained_variance` diagnostic, and the critic-free
  advantage estimators (:func:`rloo`, :func:`grpo`, :func:`reinforce_baseline`, by name in
  :data:`ADVANTAGE_ESTIMATORS`).

The log-probability functions exist because the naive recipe
``log_softmax(logits.float(), -1).gather(...)`` materialises a full ``(B, T, V)`` float32
tensor in the forward pass and keeps it alive for the backward pass. With vocabularies of
100k+ tokens that tensor dominates activation memory. Here a custom autograd function walks
the ``(B*T, V)`` rows in chunks, so only one chunk's float32 temporaries exist at a time and
the only tensor saved for backward besides small ``(B*T,)`` vectors is the caller's own
``logits``. Only ``torch`` is imported so that any part of the package (or a benchmark) can use
these helpers without pulling in Lightning or transformers.
"""

from prefl.functional.advantages import ADVANTAGE_ESTIMATORS, grpo, reinforce_baseline, rloo
from prefl.functional.logps import (
    _check_inputs,
    _ChunkedTokenLogps,
    _chunks,
    entropy_from_logits,
    next_token_targets,
    sequence_logps,
    token_logps,
)
from prefl.functional.masked import (
    explained_variance,
    global_weighted_mean,
    global_whiten,
    masked_mean,
    masked_sum,
    masked_var,
    whiten,
)
from prefl.functional.rl import KL_ESTIMATORS, gae, kl_penalty
from prefl.functional.selected import masked_sequence_logps, scored_tokens, selected_logits

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "grpo",
    "global_weighted_mean",
    "global_whiten",
    "kl_penalty",
    "masked_mean",
    "masked_sequence_logps",
    "masked_sum",
    "masked_var",
    "next_token_targets",
    "reinforce_baseline",
    "rloo",
    "scored_tokens",
    "selected_logits",
    "sequence_logps",
    "token_logps",
    "whiten",
]
__private__ = [_check_inputs, _ChunkedTokenLogps, _chunks]  # re-exported for the tests
