"""PPOModule under 2-process CPU DDP (gloo): no hang, per-rank sampling, reduced metrics.

A script written to ``tmp_path`` trains on the toy prompts for 2 rollouts per rank with
``Trainer(accelerator="cpu", devices=2, strategy="ddp")``, three times: RLOO, then GAE with the
critic (2 PPO epochs, minibatches of 2 split into micro-batches of 1: every trained parameter must
get a gradient in each backward, as DDP without ``find_unused_parameters`` requires), then GAE
with a LoRA policy (r = 4; the critic gets adapters of its own and a fully trained head; one PPO
epoch, the same minibatches). All use 2 samples per prompt, 6 new tokens and no EOS penalty (the
random policy almost never ends, and the toy oracle's scores then vary).

A callback appends, after each training batch, the rank, its prompts, completions and mean score
to ``rank{R}.jsonl`` (the module's ``rollout`` is wrapped to keep its result). The RLOO run turns
the distributed sampler off, so both ranks get the *same* prompts: their completions must still
differ, from the per-rank sampling seed alone (design §5.11). The GAE run shards the prompts as
usual. In all, the logged ``ppo/score`` must be the mean over both ranks (``sync_dist``): with
equal batch sizes, the mean of the two ranks' means. Each rank also saves its parameters at the
start and end of training: in the LoRA run the frozen base weights of policy and critic must be
bit-identical to their start, every adapter and the critic's head copy must have moved, and both
ranks must end with the same weights (DDP's averaged gradients).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from prefl import CausalLMSpec
from prefl.data import load_tokenizer
from prefl.models import build_causal_lm

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from prefl import CausalLMSpec, LoraSpec, PPOModule, PreferenceDataModule


    class Record(Callback):
        def __init__(self, out, rollouts):
            self.out, self.rollouts = out, rollouts

        def save_params(self, trainer, pl_module, when):
            state = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            path = self.out / f"params_{when}_rank{trainer.global_rank}.pt"
            torch.save({"params": state, "trainable": trainable}, path)

        def on_train_start(self, trainer, pl_module):
            self.save_params(trainer, pl_module, "start")

        def on_fit_end(self, trainer, pl_module):
            self.save_params(trainer, pl_module, "end")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            r = self.rollouts[-1]
            row = {
                "rank": trainer.global_rank,
                "prompts": r.prompts,
                "completions": r.completions,
                "score": r.scores["score"].mean().item(),
            }
            with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\\n")


    def run(out, sft, shard=True, lora=False, **kwargs):
        seed_everything(0)
        module = PPOModule(
            CausalLMSpec(name_or_path=sft, lora=LoraSpec(r=4)) if lora else sft,
            reward_fns=["toy"],
            num_samples=2,
            max_new_tokens=6,
            no_eos_score=None,
            log_samples_every=0,
            **kwargs,
        )
        rollouts = []
        rollout = module.rollout

        def recording_rollout(batch, seed):
            rollouts.append(rollout(batch, seed))
            return rollouts[-1]

        module.rollout = recording_rollout
        data = PreferenceDataModule(
            mode="prompts", max_samples=8, batch_size=2, max_length=32, max_prompt_length=16
        )
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=1,
            limit_train_batches=2,
            limit_val_batches=0,
            use_distributed_sampler=shard,
            logger=CSVLogger(out, name="csv"),
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Record(out, rollouts)],
        )
        trainer.fit(module, datamodule=data)


    def main(out, sft):
        torch.set_num_threads(1)
        run(out / "rloo", sft, shard=False, advantage_estimator="rloo", ppo_epochs=1)
        # the critic too: 2 PPO epochs of 2 minibatches of 2 micro-batches each
        run(
            out / "gae",
            sft,
            advantage_estimator="gae",
            ppo_epochs=2,
            mini_batch_size=2,
            micro_batch_size=1,
        )
        # a LoRA policy and its LoRA critic: one PPO epoch of 2 minibatches of 2 micro-batches
        run(
            out / "gae_lora",
            sft,
            lora=True,
            advantage_estimator="gae",
            ppo_epochs=1,
            mini_batch_size=2,
            micro_batch_size=1,
        )


    if __name__ == "__main__":
        main(Path(sys.argv[1]), sys.argv[2])
    """
)


@pytest.mark.slow
def test_ppo_runs_under_two_process_ddp(tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer("toy")
    sft = tmp_path / "sft"
    build_causal_lm(CausalLMSpec(config="toy"), tok).save_pretrained(sft)
    tok.save_pretrained(sft)
    script = tmp_path / "ppo_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(sft)],
        timeout=300,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    for name in ("rloo", "gae", "gae_lora"):
        check_run(out / name, critic=name != "rloo")
    check_lora_run(out / "gae_lora")


def check_run(out, critic):
    """Both ranks wrote 2 rollouts of 2 prompts × 2 samples; completions differ across ranks
    (RLOO: on the same prompts); the CSV holds 2 rows of rank-averaged metrics."""
    records = {}
    for rank in (0, 1):
        lines = (out / f"rank{rank}.jsonl").read_text().splitlines()
        records[rank] = [json.loads(line) for line in lines]
        assert len(records[rank]) == 2  # two rollouts on each rank
        assert all(r["rank"] == rank and len(r["completions"]) == 4 for r in records[rank])
    for first, second in zip(records[0], records[1], strict=True):
        assert first["completions"] != second["completions"]
        assert (first["prompts"] == second["prompts"]) == (not critic)  # RLOO: not sharded

    (metrics,) = out.glob("csv/version_*/metrics.csv")
    with metrics.open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("ppo/kl")]
    assert len(rows) == 2
    for row, first, second in zip(rows, records[0], records[1], strict=True):
        float(row["ppo/kl"])  # a number
        expected = (first["score"] + second["score"]) / 2
        assert float(row["ppo/score"]) == pytest.approx(expected, abs=1e-6)
        assert bool(row.get("ppo/value_loss")) == critic


def check_lora_run(out):
    """LoRA: policy and critic adapters (and the critic's head copy) are the trainable
    parameters, all moved; every frozen weight is bit-identical to its start; both ranks agree."""
    end = {}
    for rank in (0, 1):
        start = torch.load(out / f"params_start_rank{rank}.pt", weights_only=True)
        end[rank] = torch.load(out / f"params_end_rank{rank}.pt", weights_only=True)["params"]
        trainable = set(start["trainable"])
        assert any(n.startswith("model.") for n in trainable)
        assert any(n.startswith("value_model.") for n in trainable)
        assert any("modules_to_save" in n for n in trainable)  # the critic's head copy
        assert all("lora_" in n or "modules_to_save" in n for n in trainable)
        for name, value in start["params"].items():
            assert torch.equal(end[rank][name], value) != (name in trainable), (rank, name)
    for name, value in end[0].items():
        assert torch.equal(end[1][name], value), name
