"""DPO, reward and PPO sharded with FSDP2 (Lightning's ``ModelParallelStrategy``) on 2 CPU ranks.

Five kinds of run: DPO, DPO with TR-DPO reference syncing (local shards of the policy mixed into
the reference's), LoRA DPO (the reference is the sharded policy with adapters disabled), the
reward model, and PPO with GAE (policy, reference and value model).

A script written to ``tmp_path`` trains each module for 3 optimizer steps twice from the same seed
and the same toy SFT export, once under plain DDP and once under
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` (gloo), and records:

* which ranks read weights from disk (``from_pretrained`` is wrapped): under sharding only rank 0
  may, the other ranks build on the ``meta`` device and receive rank 0's weights by broadcast;
* at ``on_fit_start``, the gathered full weights of the policy (rank 0) against the file;
* whether every model is sharded, the frozen ones hold no trainable parameter, and no frozen
  parameter is in an optimizer;
* the final logged metrics, which must equal the DDP run's: sharding changes where the weights
  live, not the maths (for PPO that includes generation, where the ranks stop at different
  lengths: the policy is gathered once for ``generate``, so no collective is mismatched);
* ``EvalCallback``'s final evaluation (generation on rank 0 under DDP; on every rank under
  sharding, as gathering the policy is a collective): the same numbers in both runs;
* the checkpoint (a folder of ``.distcp`` shards), a resumed run from it (one more step), and
  the Hugging Face export written from the gathered weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch
    import transformers
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.strategies import ModelParallelStrategy

    from prefl import CausalLMSpec, DPOModule, EvalCallback, LoraSpec, PPOModule
    from prefl import PreferenceDataModule, RewardModule
    from prefl.models.sharding import full_state_dict, is_sharded

    READS = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            READS.append(str(args[0]))
            return _original(klass, *args, **kwargs)

        cls.from_pretrained = classmethod(spy)


    class Probe(Callback):
        def __init__(self, out):
            self.out, self.row = out, {}

        def on_fit_start(self, trainer, module):
            state = full_state_dict(module.model)
            if state is not None and trainer.is_global_zero and isinstance(module, DPOModule):
                torch.save(state, self.out / "gathered.pt")
            frozen = [m for m in (getattr(module, "reference", None),) if m is not None]
            groups = [g for o in trainer.optimizers for g in o.param_groups]
            params = {id(p) for g in groups for p in g["params"]}
            self.row.update(
                sharded=[is_sharded(m) for m in module.shardable_models()],
                frozen_trainable=sum(p.requires_grad for m in frozen for p in m.parameters()),
                frozen_in_optimizer=sum(id(p) in params for m in frozen for p in m.parameters()),
            )

        def on_fit_end(self, trainer, module):
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.row.update(metrics=metrics, step=trainer.global_step, reads=list(READS))
            rank = trainer.global_rank
            (self.out / f"rank{rank}.json").write_text(json.dumps(self.row))


    def build(kind, sft):
        if kind.endswith("_packed"):  # the same module on packed, prompt-shared batches
            return build(kind.removesuffix("_packed"), sft)
        if kind == "dpo":
            return DPOModule(sft), "pairs"
        if kind == "dpo_trdpo":  # the reference moves: alpha * policy + (1 - alpha) * ref
            return DPOModule(sft, ref_sync_every=1), "pairs"
        if kind == "dpo_lora":
            return DPOModule(CausalLMSpec(name_or_path=sft, lora=LoraSpec(r=4))), "pairs"
        if kind == "reward":
            return RewardModule(sft), "pairs"
        module = PPOModule(
            sft,
            reward_fns=["toy"],
            num_samples=2,
            max_new_tokens=8,
            no_eos_score=None,
            advantage_estimator="gae",
            log_samples_every=0,
        )
        return module, "prompts"


    def run(out, sft, kind, sharded, steps=3, ckpt=None):
        seed_everything(0)
        READS.clear()
        out.mkdir(parents=True, exist_ok=True)
        module, mode = build(kind, sft)
        packed = kind.endswith("_packed")
        data = PreferenceDataModule(
            mode=mode, max_samples=16, batch_size=2, max_length=48, max_prompt_length=16,
            packing=packed, share_prompt=packed,
        )
        strategy = ModelParallelStrategy(2, 1) if sharded else "ddp"
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=steps,
            limit_val_batches=2,
            logger=False,
            default_root_dir=out,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Probe(out)],
        )
        if kind == "dpo" and ckpt is None:  # generation-based evaluation at the end, too
            evaluation = EvalCallback(prompts=["the film was"] * 3, num_samples=2, max_new_tokens=5)
            trainer.callbacks.append(evaluation)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        if kind == "dpo" and ckpt is None and evaluation.history:
            row = {"rank": trainer.global_rank, "eval": evaluation.history[-1][1]}
            (out / f"eval{trainer.global_rank}.json").write_text(json.dumps(row))
        return module, trainer


    def main(out, sft, kinds):
        torch.set_num_threads(1)
        for kind in kinds:
            run(out / kind / "ddp", sft, kind, sharded=False)
            module, trainer = run(out / kind / "fsdp", sft, kind, sharded=True)
            if kind == "dpo_lora":
                module.export(out / kind / "export")
            if kind == "dpo":
                module.export(out / kind / "export")
                ckpt = trainer.checkpoint_callback.best_model_path
                run(out / kind / "resumed", sft, kind, sharded=True, steps=4, ckpt=ckpt)


    if __name__ == "__main__":
        main(Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","))
    """
)

KINDS = ("dpo", "dpo_trdpo", "dpo_lora", "reward", "ppo", "dpo_packed", "reward_packed")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, sft_dir):
    out = tmp_path_factory.mktemp("sharded")
    script = out / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(sft_dir), ",".join(KINDS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _rows(out, kind, run):
    return [json.loads((out / kind / run / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_only_rank_zero_reads_weights(sharded_runs, kind, sft_dir):
    """Under sharding rank 1 never calls ``from_pretrained``; under DDP both ranks do."""
    rank0, rank1 = _rows(sharded_runs, kind, "fsdp")
    assert str(sft_dir) in rank0["reads"]
    assert rank1["reads"] == []
    assert all(str(sft_dir) in row["reads"] for row in _rows(sharded_runs, kind, "ddp"))


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_is_sharded_and_frozen_ones_stay_frozen(sharded_runs, kind):
    """Policy, reference, reward and value models are all FSDP2 roots; the reference has no
    trainable parameter and none of its parameters is in an optimizer."""
    # dpo: policy and reference; dpo_lora: the policy (its reference: adapters disabled);
    # ppo: policy, reference and value model
    expected = {"dpo": 2, "dpo_trdpo": 2, "dpo_lora": 1, "reward": 1, "ppo": 3}[
        kind.removesuffix("_packed")
    ]
    for row in _rows(sharded_runs, kind, "fsdp"):
        assert row["sharded"] == [True] * expected
        assert row["frozen_trainable"] == 0
        assert row["frozen_in_optimizer"] == 0
    for row in _rows(sharded_runs, kind, "ddp"):
        assert row["sharded"] == [False] * expected


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_training_matches_ddp(sharded_runs, kind):
    """Same seed, same data: every logged metric after 3 steps equals the DDP run's."""
    ddp, fsdp = _rows(sharded_runs, kind, "ddp")[0], _rows(sharded_runs, kind, "fsdp")[0]
    assert fsdp["step"] == ddp["step"] > 0
    assert set(fsdp["metrics"]) == set(ddp["metrics"])
    for name, value in ddp["metrics"].items():
        assert fsdp["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("kind", ["dpo_packed", "reward_packed"])
def test_sharded_packed_training_matches_padded(sharded_runs, kind):
    """Packed, prompt-shared batches under FSDP2 end with the padded sharded run's metrics."""
    padded = _rows(sharded_runs, kind.removesuffix("_packed"), "fsdp")[0]["metrics"]
    packed = _rows(sharded_runs, kind, "fsdp")[0]["metrics"]
    assert set(packed) == set(padded)
    for name, value in padded.items():
        assert packed[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_rank_zero_weights_are_broadcast_exactly(sharded_runs, sft_dir):
    """The gathered policy at the start of the sharded run is the SFT export, bit for bit."""
    gathered = torch.load(sharded_runs / "dpo" / "fsdp" / "gathered.pt", weights_only=True)
    saved = load_file(str(Path(sft_dir) / "model.safetensors"))
    for name, value in saved.items():
        assert torch.equal(gathered[name], value), name


def test_sharded_checkpoint_resumes_and_exports(sharded_runs):
    """The checkpoint is a folder of per-rank shards; a run resumed from it continues to step 4;
    the export loads with ``from_pretrained`` and holds the trained (changed) weights."""
    from transformers import AutoModelForCausalLM

    ckpts = list((sharded_runs / "dpo" / "fsdp" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].is_dir()
    assert sorted(p.name for p in ckpts[0].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed = _rows(sharded_runs, "dpo", "resumed")[0]
    assert resumed["step"] == 4
    model = AutoModelForCausalLM.from_pretrained(sharded_runs / "dpo" / "export")
    start = torch.load(sharded_runs / "dpo" / "fsdp" / "gathered.pt", weights_only=True)
    trained = model.state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    assert trained[name].shape == start[name].shape
    assert not torch.equal(trained[name], start[name])


def test_generation_callbacks_run_under_sharding(sharded_runs):
    """``EvalCallback`` evaluates on rank 0 under DDP and on both ranks under sharding (no hang),
    with the same results: the sharded policy gathered for generation is the DDP policy."""
    run = sharded_runs / "dpo"
    assert not (run / "ddp" / "eval1.json").exists()
    ddp = json.loads((run / "ddp" / "eval0.json").read_text())["eval"]
    for rank in (0, 1):
        fsdp = json.loads((run / "fsdp" / f"eval{rank}.json").read_text())["eval"]
        assert fsdp.keys() == ddp.keys()
        for name, value in ddp.items():
            assert fsdp[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_sharded_lora_exports_merged_weights(sharded_runs, sft_dir):
    """LoRA under sharding: the export is the base with the trained adapters merged (rank 0
    rebuilds an unsharded copy to merge into), so it differs from the SFT weights exactly in
    the adapted linear layers (``all-linear``: the attention and MLP projections)."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(sharded_runs / "dpo_lora" / "export")
    base = load_file(str(Path(sft_dir) / "model.safetensors"))
    state = merged.state_dict()
    changed = {k for k, v in base.items() if k in state and not torch.equal(state[k], v)}
    assert changed and all(k.endswith("_proj.weight") for k in changed), changed
    assert "model.embed_tokens.weight" not in changed
    assert not any("lora" in k for k in state)
