"""HFExport: write the trained model and tokenizer as a Hugging Face directory after ``fit``.

The next stage (reward model, DPO, PPO) then loads the result by path, like any hub checkpoint:
``AutoModelForCausalLM.from_pretrained(dirpath)``. Weights are safetensors; LoRA adapters are
merged first. Every rank calls ``export`` (sharded weights are gathered collectively); only
the global-zero process writes.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class HFExport(Callback):
    """Export the module's model at the end of ``fit``.

    Args:
        dirpath: Directory to write (``config.json``, ``model.safetensors``, tokenizer files).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Call ``pl_module.export(dirpath)`` on every rank (a sharded model is gathered
        collectively); the module writes on global rank zero only."""
        if not hasattr(pl_module, "export"):
            raise TypeError(f"HFExport: {type(pl_module).__name__} has no export() method")
        out = pl_module.export(self.dirpath)
        rank_zero_info(f"prefl: exported the model to {out}")
        trainer.strategy.barrier("prefl-export")
