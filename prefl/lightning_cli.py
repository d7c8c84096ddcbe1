"""``prefl fit|validate|test|predict``: LightningCLI over prefl's modules and data module.

``prefl fit|validate|test|predict -c configs/....yaml``. The module is chosen by ``class_path``
(``prefl.SFTModule``, ...). Values that must agree between data and model are *linked*, not
repeated: the model receives the data module's tokenizer instance (with its added pad token).
TensorBoard is the default logger. The ``prefl`` command itself is :func:`prefl.cli.main`.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from prefl.data import PreferenceDataModule
from prefl.modules import CausalLMModule


def _tokenizer_of(datamodule: PreferenceDataModule):
    return datamodule.tokenizer


class PreflCLI(LightningCLI):
    """LightningCLI with prefl's links between the data module and the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's tokenizer into the model."""
        parser.link_arguments(
            "data", "model.init_args.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate"
        )


def build_cli(
    args: list[str] | None = None, run: bool = True, cli_class: type[PreflCLI] = PreflCLI
) -> PreflCLI:
    """Build (and by default run) the CLI.

    Args:
        args: Command-line arguments, e.g. ``["fit", "-c", "configs/toy/sft.yaml"]``.
        run: Run the subcommand; False only parses and instantiates (no subcommand in ``args``).
        cli_class: The CLI class (tests pass a subclass that skips instantiation).
    """
    return cli_class(
        CausalLMModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "prefl"},
            }
        },
        args=args,
        run=run,
    )
