"""The prefl CLI: every YAML under configs/ parses, links hold, --print_config round-trips and
`python -m prefl fit --help` works. The toy pipeline and the CLI runs from its exports are in
tests/test_pipeline.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefl.cli import PreflCLI, build_cli

ROOT = Path(__file__).resolve().parents[1]
# configs/cluster/* are trainer-only overlays, parsed with every stage config in
# tests/test_cluster_configs.py
CONFIGS = sorted(p for p in ROOT.joinpath("configs").rglob("*.yaml") if p.parent.name != "cluster")


class ParseOnly(PreflCLI):
    """Parse and validate a config without building anything (real-model configs need the hub)."""

    def instantiate_classes(self) -> None:
        pass


def test_configs_are_found_recursively():
    names = {p.relative_to(ROOT).as_posix() for p in CONFIGS}
    assert {f"configs/toy/{n}.yaml" for n in ("sft", "dpo", "reward", "ppo", "grpo")} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_parses(path):
    cli = build_cli(["-c", str(path)], run=False, cli_class=ParseOnly)
    assert cli.config["model"]["class_path"].startswith("prefl.")
    assert cli.config["data"]["tokenizer"]


def test_toy_config_instantiates_with_the_tokenizer_linked():
    cli = build_cli(["-c", str(ROOT / "configs/toy/sft.yaml")], run=False)
    assert cli.model.tokenizer is cli.datamodule.tokenizer
    assert cli.datamodule.mode == "sft"
    assert type(cli.model).__name__ == "SFTModule"


def test_unknown_key_is_rejected_naming_it(capsys):
    with pytest.raises(SystemExit):
        build_cli(["-c", str(ROOT / "configs/toy/sft.yaml"), "--data.no_such_key", "1"], run=False)
    assert "no_such_key" in capsys.readouterr().err


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "-c", str(ROOT / "configs/toy/sft.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    first = tmp_path / "first.yaml"
    first.write_text(printed)
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(first), "--print_config"])
    again = capsys.readouterr().out
    assert yaml.safe_load(again) == yaml.safe_load(printed)
    assert yaml.safe_load(printed)["model"]["init_args"]["model"]["config"] == "toy"


def test_python_dash_m_prefl_help():
    out = subprocess.run(
        [sys.executable, "-m", "prefl", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--data.max_length" in out.stdout and "--model" in out.stdout
