"""SampleReport: sample from the trained model at the end of ``fit`` and report its quality.

It answers "does the model produce well-formed answers, and how good are they?": the EOS rate
(completions that end by themselves), the mean length, and the mean reward under a reward
function (the toy task's oracle by default), compared with a target such as the SFT corpus's own
mean reward. The numbers are printed, logged as ``samples/*`` scalars, and a few sample texts
go to TensorBoard.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from prefl.data.prompts import resolve_prompts
from prefl.generation.rewards import resolve_reward_fn
from prefl.generation.sample import Samples, sample_completions, score_samples
from prefl.tasks import toy


class SampleReport(Callback):
    """Sample completions for held-out prompts after ``fit`` and report EOS rate and reward.

    Args:
        prompts: ``"toy"`` (the toy task's held-out prompts) or a list of prompts: texts, or
            conversations (``{"role", "content"}`` message lists, asked in the chat template).
        chat: Ask each text prompt as one user turn in the tokenizer's chat template (with its
            generation prompt), as an instruct model expects; False asks the bare text.
        num_samples: Completions per prompt.
        max_new_tokens: Most tokens per completion.
        temperature: Sampling temperature: samples come from exactly
            ``softmax(logits / temperature)`` (no top-k / top-p or any other processor of the
            checkpoint's ``generation_config``; see :func:`prefl.generation.sampling_config`).
        reward: Reward function, ``"toy"`` or ``"package.module:function"``; None = no reward.
        target_reward: Mean reward to compare with; None with the toy reward = the mean oracle
            reward of the toy SFT corpus.
        batch_size: Prompts per ``generate`` call.
        seed: Sampling seed.
        num_texts: How many sample texts to print and log.
        compare_reference: Also sample from the module's reference (``reference_context()``,
            e.g. DPO's frozen SFT model) and report its reward, the gain, and the sequence-level
            KL(policy || reference) on the policy's samples (log-probs at temperature 1).
    """

    def __init__(
        self,
        prompts: str | list[str | list[dict[str, str]]] = "toy",
        chat: bool = False,
        num_samples: int = 8,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        reward: str | None = "toy",
        target_reward: float | None = None,
        batch_size: int = 128,
        seed: int = 0,
        num_texts: int = 4,
        compare_reference: bool = False,
    ) -> None:
        self.prompts = resolve_prompts(prompts, chat)
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.temperature, self.batch_size, self.seed = temperature, batch_size, seed
        self.reward_fn = resolve_reward_fn(reward) if reward else None
        if target_reward is None and reward == "toy":
            target_reward = toy.corpus_reward(toy.toy_splits("sft")["train"])
        self.target_reward, self.num_texts = target_reward, num_texts
        self.compare_reference = compare_reference
        self.results: dict[str, float] = {}

    def report(self, samples: Samples) -> dict[str, float]:
        """Summarise samples: ``eos_rate``, ``mean_length`` and (with a reward) ``reward``."""
        n = len(samples.completions)
        out = {"eos_rate": sum(samples.ended) / n, "mean_length": sum(samples.lengths) / n}
        if self.reward_fn is not None:
            rewards = self.reward_fn(samples.prompts, samples.completions)
            out["reward"] = sum(rewards) / n
            if self.target_reward is not None:
                out["target_reward"] = self.target_reward
        return out

    def sample(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> Samples:
        """Sample this report's completions from ``model``."""
        return sample_completions(
            model,
            tokenizer,
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            num_samples=self.num_samples,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def compare(self, pl_module: LightningModule, samples: Samples) -> dict[str, float]:
        """Reference figures: its EOS rate and reward on its own samples (same prompts and seed),
        the reward gain, and KL(policy || reference) estimated on the policy's samples."""
        tokenizer = pl_module.resolve_tokenizer()
        pad_id = tokenizer.pad_token_id
        policy_scores = score_samples(pl_module.model, samples, pad_id, self.batch_size)
        with pl_module.reference_context() as reference:
            ref_report = self.report(self.sample(reference, tokenizer))
            ref_scores = score_samples(reference, samples, pad_id, self.batch_size)
        out = {
            "kl": (policy_scores - ref_scores).mean().item(),
            "reference_eos_rate": ref_report["eos_rate"],
        }
        if "reward" in ref_report:
            out["reference_reward"] = ref_report["reward"]
            out["reward_gain"] = self.results["reward"] - ref_report["reward"]
        return out

    def lines(self) -> list[str]:
        """The printed report."""
        r = self.results
        out = [f"  EOS rate    {r['eos_rate']:.3f}", f"  mean length {r['mean_length']:.2f} tokens"]
        if "reward" in r:
            line = f"  mean reward {r['reward']:+.3f}"
            if "target_reward" in r:
                gap = r["reward"] - r["target_reward"]
                line += f" (target {r['target_reward']:+.3f}, gap {gap:+.3f})"
            out.append(line)
        if "kl" in r:
            out.insert(1, f"  reference EOS rate {r['reference_eos_rate']:.3f}")
            if "reference_reward" in r:
                out.append(
                    f"  reference reward {r['reference_reward']:+.3f}, gain {r['reward_gain']:+.3f}"
                )
            out.append(f"  KL(policy || reference) {r['kl']:.3f} nats per completion")
        if "pair_accuracy" in r:
            out.append(f"  held-out pair accuracy (implicit reward) {r['pair_accuracy']:.3f}")
        return out

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sample, print the report and log it (global rank zero; every rank samples when the
        model is sharded, since gathering it for generation is a collective)."""
        if not runs_on_this_rank(trainer, pl_module):
            return
        samples = self.sample(pl_module.model, pl_module.resolve_tokenizer())
        self.results = self.report(samples)
        if self.compare_reference:
            self.results.update(self.compare(pl_module, samples))
        accuracy = trainer.callback_metrics.get("val/rewards/accuracies")
        if accuracy is not None:
            self.results["pair_accuracy"] = float(accuracy)
        pairs = zip(samples.prompts, samples.completions, strict=True)
        texts = [f"  {p!r} -> {c!r}" for p, c in pairs]
        shown = texts[:: self.num_samples][: self.num_texts]
        header = (
            f"prefl samples: {len(samples.completions)} completions of "
            f"{len(self.prompts)} held-out prompts"
        )
        rank_zero_info("\n".join([header, *self.lines(), *shown]))
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"samples/{k}": v for k, v in self.results.items()}, step=trainer.global_step
            )
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", "\n\n".join(texts[:32]), trainer.global_step)
                logger.experiment.flush()


def runs_on_this_rank(trainer: Trainer, pl_module: LightningModule) -> bool:
    """Generation-based callbacks run on global rank zero only, except with a sharded model: its
    parameters are gathered for ``generate`` by every rank at once (loggers write on rank zero
    whatever calls them)."""
    return trainer.is_global_zero or bool(getattr(pl_module, "sharded", False))
