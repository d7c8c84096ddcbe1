"""What the real-model integration tests share besides fixtures (those are in ``conftest.py``):
the sizes of the runs, the pairs' data module, the optimizers, a quiet bf16-mixed CPU
``Trainer``, a callback that keeps each step's loss, the reward-model run (that PPO also needs),
greedy replies through plain ``generate``, and the check that the vocabulary is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from prefl import HFExport, PreferenceDataModule, RewardModule
from prefl.training.precision import cpu_precision

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SmolLM2's vocabulary: prefl must neither add a token nor resize the embeddings.
VOCAB = 49_152
#: Transcripts (chosen and rejected) of at most this many characters: about 100 tokens with the
#: chat template's system prompt, so ``max_length=192`` truncates none of them.
MAX_CHARS = 300
N_TRAIN = 64
N_HELD_OUT = 192
#: Prompts of the greedy replies that every export must produce.
PROMPTS = ("What is the capital of France?", "How do I make a cup of tea?")


class StepLosses(Callback):
    """Keeps the loss of every training batch (``losses``), in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any
    ) -> None:
        """Record the batch's loss (automatic optimisation returns it)."""
        if outputs is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))


class MetricHistory(Callback):
    """Keeps the logged value of each of ``keys`` after every training batch (``history[key]``,
    one float per batch): PPO logs its rollout metrics once per batch, on the step."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.history: dict[str, list[float]] = {key: [] for key in keys}

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        """Record the batch's values of ``keys``."""
        for key, values in self.history.items():
            values.append(float(trainer.callback_metrics[key]))


def cpu_trainer(**kwargs: Any) -> Trainer:
    """A quiet CPU ``Trainer`` at the fast precision of this CPU (``bf16-mixed`` where bf16 is
    native, float32 elsewhere: :func:`prefl.training.precision.cpu_precision`): no logger, no
    checkpoints, no progress bar, no sanity validation; ``kwargs`` add to or override these."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": cpu_precision(),
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    return Trainer(**{**settings, **kwargs})


@torch.no_grad()
def greedy_replies(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int = 8) -> list[str]:
    """Greedy replies of ``model`` to :data:`PROMPTS`, each rendered as one user turn in the chat
    template with its generation prompt (plain ``generate``, as a user of the export would)."""
    replies = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return replies


def assert_vocabulary_kept(model: torch.nn.Module) -> None:
    """The model still has SmolLM2's 49,152-token vocabulary and tied input/output embeddings."""
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == VOCAB and model.config.vocab_size == VOCAB
    head = model.get_output_embeddings()
    if head is not None:  # a causal LM (a sequence classifier has a scalar head instead)
        assert model.config.tie_word_embeddings
        assert head.weight.data_ptr() == embeddings.data_ptr()


def pairs_data(model_dir: str | Path, rows: Any, **kwargs: Any) -> PreferenceDataModule:
    """``rows`` (HH transcripts) as pairs in SmolLM2's chat template: batches of 8 (16 for
    evaluation), lengths padded to multiples of 32; short rows are not cut at 192 tokens."""
    settings: dict[str, Any] = {
        "mode": "pairs",
        "row_format": "hh_chat",
        "max_length": 192,
        "max_prompt_length": 128,
        "batch_size": 8,
        "eval_batch_size": 16,
        "pad_to_multiple_of": 32,
    }
    return PreferenceDataModule(rows, str(model_dir), **{**settings, **kwargs})


def adamw(lr: float) -> Any:
    """An optimizer factory: AdamW at ``lr``, no weight decay."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


#: The reward model's learning rates: its new scalar head (``head_lr``), and the pretrained
#: backbone. The head starts random (std 1/24); at the backbone's learning rate AdamW moves each
#: of its weights by about 2e-5 a step, so in 8 steps it would stay where it started and only
#: the backbone would learn. Measured on these pairs with one learning rate for all: 3e-5 (24
#: steps) gave 0.571 held-out accuracy, 1e-4 (8 steps) 0.504.
HEAD_LR, BACKBONE_LR = 2e-3, 2e-5


def on_training_pairs(rows: Any) -> datasets.DatasetDict:
    """``rows`` with its training pairs as the validation split too: validating on it measures
    the loss on what training saw."""
    return datasets.DatasetDict({"train": rows["train"], "validation": rows["train"]})


def training_pairs_loss(
    trainer: Trainer, module: LightningModule, model_dir: Path, rows: Any
) -> float:
    """The module's mean loss over the training pairs of ``rows`` (validated as if held out)."""
    data = pairs_data(model_dir, on_training_pairs(rows))
    return float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"])


@dataclass
class RewardRun:
    """What :func:`train_reward_model` measured (the held-out accuracy after training, the loss
    on the training pairs before and after) and wrote (``export``; ``held_out``: the data module
    of the held-out pairs)."""

    accuracy: float
    train_loss_before: float
    train_loss_after: float
    export: Path
    held_out: PreferenceDataModule


def train_reward_model(model_dir: Path, rows: Any, export: Path) -> RewardRun:
    """Fit one epoch over the training pairs (bf16-mixed, AdamW at :data:`BACKBONE_LR`, the head
    at :data:`HEAD_LR`) and export
    to ``export``; validate on the training pairs before and after (fit validates on them at
    its end, and the exported reward statistics are theirs: the cheapest split, 64 pairs), then
    on the held-out pairs."""
    train = pairs_data(model_dir, on_training_pairs(rows))
    seed_everything(0)
    module = RewardModule(str(model_dir), head_lr=HEAD_LR, optimizer=adamw(BACKBONE_LR))
    trainer = cpu_trainer(max_epochs=1, callbacks=[HFExport(str(export))])
    loss_before = trainer.validate(module, datamodule=train, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=train)
    loss_after = float(trainer.callback_metrics["val/loss"])
    held_out = pairs_data(model_dir, rows)
    accuracy = trainer.validate(module, datamodule=held_out, verbose=False)[0]["val/accuracy"]
    return RewardRun(accuracy, loss_before, loss_after, export, held_out)
