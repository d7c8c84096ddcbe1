"""The cluster overlays and launch scripts under configs/cluster/.

Every ``configs/cluster/*.yaml`` (found by walking the folder, so a new overlay is tested without
editing this file) is a trainer-only overlay: it parses combined with every real-model example
config (``prefl fit -c configs/examples/X.yaml -c configs/cluster/Y.yaml``), its trainer values win
over the stage's while the stage keeps the rest, and its strategy builds a ``Trainer`` on CPU —
except DeepSpeed, which cannot be constructed without the ``deepspeed`` package (not a prefl
dependency, CUDA only), so that overlay is only parsed. The launch scripts pass ``bash -n``, name
config files that exist, and, run with stub ``torchrun`` / ``srun`` commands that print their
arguments, produce ``prefl fit`` command lines that parse, with ``data_parallel_size`` equal to
the world size under FSDP.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from prefl.cli import PreflCLI, build_cli

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "configs/cluster"
OVERLAYS = sorted(CLUSTER.rglob("*.yaml"))
EXAMPLES = sorted((ROOT / "configs/examples").rglob("*.yaml"))
SCRIPTS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".sh", ".sbatch"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# What the shipped overlays must say (a new overlay gets the generic checks only).
EXPECTED = {
    "ddp.yaml": ("DDPStrategy", {"find_unused_parameters": False}),
    "fsdp.yaml": ("ModelParallelStrategy", {"data_parallel_size": 8, "tensor_parallel_size": 1}),
    "deepspeed_zero3.yaml": (
        "DeepSpeedStrategy",
        {"stage": 3, "offload_optimizer": False, "offload_parameters": False},
    ),
}


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


class ParseOnly(PreflCLI):
    """Parse and validate without building anything (example configs need the hub)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str) -> dict:
    return build_cli(list(args), run=False, cli_class=ParseOnly).config


def test_the_overlays_and_scripts_are_found():
    names = {p.name for p in OVERLAYS}
    assert set(EXPECTED) <= names
    assert {"slurm.sbatch", "torchrun.sh"} <= {p.name for p in SCRIPTS}
    assert {"dpo_hh.yaml", "reward_hh.yaml", "ppo_hh.yaml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=name)
def test_overlay_is_trainer_only(overlay):
    raw = yaml.safe_load(overlay.read_text())
    assert set(raw) == {"trainer"}, "an overlay sets trainer keys only"
    trainer = raw["trainer"]
    assert trainer["accelerator"] == "gpu"
    assert trainer["precision"] in ("bf16-mixed", "bf16-true")
    assert isinstance(trainer["devices"], int) and trainer["num_nodes"] == 1
    assert trainer["strategy"]["class_path"].startswith("lightning.pytorch.strategies.")


@pytest.mark.parametrize("example", EXAMPLES, ids=name)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=name)
def test_overlay_parses_on_every_example(overlay, example):
    stage = yaml.safe_load(example.read_text())
    config = parse("-c", str(example), "-c", str(overlay))
    trainer, own = config["trainer"], yaml.safe_load(overlay.read_text())["trainer"]
    for key in ("accelerator", "devices", "num_nodes", "precision"):
        assert trainer[key] == own[key], key  # the later file wins
    strategy = trainer["strategy"]
    assert strategy["class_path"] == own["strategy"]["class_path"]
    for key, value in own["strategy"].get("init_args", {}).items():
        assert strategy["init_args"][key] == value, key
    if overlay.name in EXPECTED:
        cls, settings = EXPECTED[overlay.name]
        assert strategy["class_path"] == f"lightning.pytorch.strategies.{cls}"
        assert {k: strategy["init_args"][k] for k in settings} == settings
    # the stage config keeps what the overlay does not set
    assert config["model"]["class_path"] == stage["model"]["class_path"]
    assert config["data"]["dataset"] == stage["data"]["dataset"]
    for key in ("max_epochs", "accumulate_grad_batches", "gradient_clip_val"):
        if key in stage["trainer"]:
            assert trainer[key] == stage["trainer"][key], key
    callbacks = [c["class_path"] for c in trainer["callbacks"]]
    assert callbacks == [c["class_path"] for c in stage["trainer"]["callbacks"]]


def test_command_line_flags_override_the_overlay():
    """The README's two-node FSDP command: flags after the files win."""
    config = parse(
        "-c",
        str(ROOT / "configs/examples/dpo_hh.yaml"),
        "-c",
        str(CLUSTER / "fsdp.yaml"),
        "--trainer.num_nodes",
        "2",
        "--trainer.strategy.init_args.data_parallel_size",
        "16",
    )
    trainer = config["trainer"]
    assert trainer["num_nodes"] == 2 and trainer["devices"] == 8
    assert trainer["strategy"]["init_args"]["data_parallel_size"] == 16
    assert trainer["strategy"]["init_args"]["tensor_parallel_size"] == 1


def needs_deepspeed(overlay: Path) -> bool:
    return "DeepSpeed" in yaml.safe_load(overlay.read_text())["trainer"]["strategy"]["class_path"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=name)
def test_overlay_strategy_builds_a_cpu_trainer(overlay, tmp_path, monkeypatch):
    """Instantiate data, model and Trainer through the CLI with the toy SFT config and the
    overlay, switched to one CPU process (no fit)."""
    if needs_deepspeed(overlay) and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeedStrategy raises without the deepspeed package: parsed only")
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(ROOT / "configs/toy/sft.yaml"), "-c", str(overlay)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    args += ["--trainer.precision", "bf16-mixed"]
    own = yaml.safe_load(overlay.read_text())["trainer"]["strategy"]
    if "data_parallel_size" in own.get("init_args", {}):
        args += ["--trainer.strategy.init_args.data_parallel_size", "1"]
    cli = build_cli(args, run=False)
    strategy = cli.trainer.strategy
    assert type(strategy).__name__ == own["class_path"].rsplit(".", 1)[1]
    assert strategy.root_device.type == "cpu"
    if type(strategy).__name__ == "ModelParallelStrategy":
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (1, 1)
    if type(strategy).__name__ == "DDPStrategy":
        assert strategy._ddp_kwargs["find_unused_parameters"] is False


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed")
def test_deepspeed_overlay_is_parse_only_without_deepspeed():
    """Why the DeepSpeed overlay is not instantiated here: the strategy refuses to exist."""
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="DeepSpeed"):
        DeepSpeedStrategy(stage=3)


# ---- launch scripts ----------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=name)
def test_script_is_valid_bash_and_names_existing_configs(script):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    paths = set(re.findall(r"configs/[\w/.-]+\.yaml", script.read_text()))
    assert paths, "the script should name the configs it runs"
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, missing


def run_with_stub(
    script: Path, stub: str, cwd: Path, tmp_path: Path, *args: str, **env: str
) -> list[str]:
    """Run ``script`` (with ``args``) with ``stub`` (torchrun / srun) replaced by a command that
    writes its arguments one per line; return them."""
    bin_dir, record = tmp_path / "bin", tmp_path / f"{stub}.args"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / stub
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{record}"\n')
    fake.chmod(0o755)
    environ = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    out = subprocess.run(
        ["bash", str(script), *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return record.read_text().splitlines()


def parse_fit_command(argv: list[str]) -> dict:
    """Parse the arguments after ``fit`` of a recorded launch command (paths from the root)."""
    rest = argv[argv.index("fit") + 1 :]
    rest = [str(ROOT / a) if a.startswith("configs/") else a for a in rest]
    rest = [a for a in rest if a not in ("--ckpt_path", "last")]  # fit's own, not a config key
    return parse(*rest)


def world_size_matches(trainer: dict) -> None:
    world = trainer["num_nodes"] * int(trainer["devices"])  # "8" from the command line: a str
    if trainer["strategy"]["class_path"].endswith("ModelParallelStrategy"):
        assert trainer["strategy"]["init_args"]["data_parallel_size"] == world


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize(
    "env, nodes, strategy",
    [
        ({}, 1, "DDPStrategy"),
        ({"OVERLAY": "configs/cluster/fsdp.yaml"}, 1, "ModelParallelStrategy"),
        (
            {"NNODES": "2", "HEAD": "node001", "OVERLAY": "configs/cluster/fsdp.yaml"},
            2,
            "ModelParallelStrategy",
        ),
        (
            {"NNODES": "2", "OVERLAY": "configs/cluster/deepspeed_zero3.yaml"},
            2,
            "DeepSpeedStrategy",
        ),
    ],
)
def test_torchrun_script_commands_parse(env, nodes, strategy, tmp_path):
    argv = run_with_stub(CLUSTER / "torchrun.sh", "torchrun", ROOT, tmp_path, **env)
    assert argv[argv.index("-m") + 1] == "prefl"
    assert argv[argv.index("--nproc-per-node") + 1] == "8"
    if nodes == 1:
        assert "--standalone" in argv
    else:
        assert argv[argv.index("--nnodes") + 1] == str(nodes)
        assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
        assert argv[argv.index("--rdzv-endpoint") + 1].endswith(":29500")
    trainer = parse_fit_command(argv)["trainer"]
    assert trainer["num_nodes"] == nodes and int(trainer["devices"]) == 8
    assert trainer["strategy"]["class_path"] == f"lightning.pytorch.strategies.{strategy}"
    world_size_matches(trainer)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_torchrun_script_passes_extra_arguments(tmp_path):
    argv = run_with_stub(CLUSTER / "torchrun.sh", "torchrun", ROOT, tmp_path, "--ckpt_path", "last")
    assert argv[-2:] == ["--ckpt_path", "last"]
    parse_fit_command(argv)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_slurm_script_command_parses_and_matches_its_allocation(tmp_path):
    script = CLUSTER / "slurm.sbatch"
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))
    nodes, per_node = int(header["nodes"]), int(header["ntasks-per-node"])
    assert int(header["gpus-per-node"]) == per_node  # one task per GPU
    argv = run_with_stub(script, "srun", tmp_path, tmp_path, SLURM_JOB_NUM_NODES=str(nodes))
    assert argv[0] == "prefl" and argv[1] == "fit"
    trainer = parse_fit_command(argv)["trainer"]
    assert trainer["num_nodes"] == nodes and int(trainer["devices"]) == per_node
    assert trainer["strategy"]["class_path"].endswith("ModelParallelStrategy")
    world_size_matches(trainer)
