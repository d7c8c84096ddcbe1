"""EntropyReport: how close the toy SFT model is to its limit, the generator's own entropy.

SFT minimises the cross-entropy of the model against the corpus's generator; its floor is the
generator's entropy. On the toy task the generator can score its own samples exactly
(:func:`prefl.tasks.toy.generator_logprob`), so at the end of ``fit`` this callback computes, on
the data module's validation rows, the model's NLL per completion token (EOS included) and the
generator's NLL per token on the very same rows (an estimate of its entropy with the same
sampling noise, which cancels in the ratio), next to the exact entropy per token over the
evaluation prompts (:func:`prefl.tasks.toy_optimum.entropy_per_token`).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from prefl.data.collate import PreferenceCollator
from prefl.functional import next_token_targets, token_logps
from prefl.tasks import toy
from prefl.tasks.toy_optimum import entropy_per_token


class EntropyReport(Callback):
    """Print and log the SFT model's held-out NLL per token against the toy generator's.

    Results (also in :attr:`results`): ``model_nll``, ``generator_nll`` (nats per token on the
    validation rows), ``ratio`` (model / generator; 1 is the limit) and ``exact_entropy``.
    """

    def __init__(self) -> None:
        self.results: dict[str, float] = {}

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, datamodule: object) -> dict[str, float]:
        """The NLLs per token of ``model`` and of the toy generator on the validation rows."""
        tokenizer = datamodule.tokenizer
        split = datamodule.datasets[datamodule.hparams.val_split]
        generator_lp, tokens = 0.0, 0
        for row in split:
            prompt = tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)
            completion = tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
            generator_lp += toy.generator_logprob(prompt, completion)
            tokens += len(row["completion_ids"])
        was_training = model.training
        model.eval()
        model_nll, model_tokens = 0.0, 0
        device = next(model.parameters()).device
        # padded rows whatever the data module's layout (packing changes only the layout)
        padded = PreferenceCollator(tokenizer.pad_token_id, "sft")
        for batch in DataLoader(split, batch_size=64, collate_fn=padded):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            labels, loss_mask = next_token_targets(ids, batch["loss_mask"].to(device))
            model_nll -= float(token_logps(logits, labels, loss_mask).sum())
            model_tokens += int(loss_mask.sum())
        model.train(was_training)
        if model_tokens != tokens:
            raise RuntimeError(f"EntropyReport: {model_tokens} scored tokens, {tokens} in the rows")
        generator = -generator_lp / tokens
        results = {"model_nll": model_nll / tokens, "generator_nll": generator}
        finite = math.isfinite(generator)
        results["ratio"] = results["model_nll"] / generator if finite else math.nan
        results["exact_entropy"] = entropy_per_token()
        return results

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure, print and log (global rank zero)."""
        if not trainer.is_global_zero:
            return
        self.results = self.measure(pl_module.model, trainer.datamodule)
        r = self.results
        rank_zero_info(
            f"prefl toy SFT: held-out NLL {r['model_nll']:.4f} nats/token; the generator's on "
            f"the same rows {r['generator_nll']:.4f} (ratio {r['ratio']:.4f}; exact entropy "
            f"{r['exact_entropy']:.4f} over the evaluation prompts)"
        )
        for logger in trainer.loggers:
            logger.log_metrics({f"entropy/{k}": v for k, v in r.items()}, trainer.global_step)
