"""EvalCallback: :func:`prefl.generation.evaluate.evaluate` during training and at its end, logged
as ``eval/*``.

Each evaluation samples from the module's policy (``pl_module.model``) and from its reference
(``pl_module.reference_context()``, e.g. DPO's and PPO's frozen SFT model) on held-out prompts and
logs reward, KL, win rate, EOS rate, length and diversity to every logger (TensorBoard by
default). :attr:`EvalCallback.history` keeps ``(step, results)`` of every evaluation: one point per
evaluated checkpoint on the reward–KL frontier.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from prefl.callbacks.samples import runs_on_this_rank
from prefl.data.prompts import resolve_prompts
from prefl.generation.evaluate import evaluate
from prefl.generation.rewards import resolve_reward_fn


class EvalCallback(Callback):
    """Evaluate the policy against its reference every ``every_n_steps`` and after ``fit``.

    Args:
        prompts: ``"toy"`` (the toy task's held-out prompts) or a list of prompts: texts, or
            conversations (``{"role", "content"}`` message lists, asked in the chat template).
        chat: Ask each text prompt as one user turn in the tokenizer's chat template (with its
            generation prompt), as an instruct model expects; False asks the bare text.
        reward: ``"toy"`` (the oracle) or ``"package.module:function"``.
        every_n_steps: Evaluate every this many training batches; 0 = only after ``fit``.
        num_samples: Completions per prompt.
        max_new_tokens: Most tokens per completion.
        temperature: Sampling temperature: samples come from exactly
            ``softmax(logits / temperature)``, whatever the checkpoints' generation configs say
            (see :func:`prefl.generation.evaluate.evaluate`).
        seed: Sampling seed (the same at every evaluation, so points are comparable).
    """

    def __init__(
        self,
        prompts: str | list[str | list[dict[str, str]]] = "toy",
        chat: bool = False,
        reward: str = "toy",
        every_n_steps: int = 0,
        num_samples: int = 4,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.prompts = resolve_prompts(prompts, chat)
        self.reward_fn = resolve_reward_fn(reward)
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.history: list[tuple[int, dict[str, float]]] = []

    def run(self, trainer: Trainer, pl_module: LightningModule, step: int) -> dict[str, float]:
        """Evaluate now, log ``eval/*`` and append to :attr:`history`."""
        with pl_module.reference_context() as reference:
            results = evaluate(
                pl_module.model,
                reference,
                pl_module.resolve_tokenizer(),
                self.prompts,
                self.reward_fn,
                self.num_samples,
                self.temperature,
                self.max_new_tokens,
                self.seed,
            )
        self.history.append((step, results))
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in results.items()}, step=step)
        return results

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        """Evaluate every ``every_n_steps`` batches (global rank zero; every rank when the model
        is sharded, since gathering it for generation is a collective)."""
        batches = trainer.fit_loop.total_batch_idx + 1
        due = self.every_n_steps and batches % self.every_n_steps == 0
        if due and runs_on_this_rank(trainer, pl_module):
            self.run(trainer, pl_module, batches)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate the final policy (global rank zero, or every rank when sharded)."""
        step = trainer.fit_loop.total_batch_idx + 1
        done = bool(self.history) and self.history[-1][0] == step
        if runs_on_this_rank(trainer, pl_module) and not done:
            self.run(trainer, pl_module, step)
