"""Data parallelism changes nothing: 2-process CPU DDP (gloo) gives the numbers of one process.

Method. A helper script (written to a temporary folder) holds every run: DPO, the reward model
and PPO, each built with ``seed_everything(0)`` from the same toy SFT export and trained with
plain SGD (no Adam: its first step is ``lr·sign(g)``, which would blow float noise in tiny
gradient entries up to ``lr``) and no learning-rate schedule. The pytest process imports the
script and runs it on one device, with one batch holding the whole training set; a subprocess
runs the same script under ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``, each rank
getting half the rows. All DDP fits happen in that one subprocess, so the 2-process start is paid
once. A callback records, on every rank, the loss ``training_step`` returns, the
``sample_weight`` of every train and validation batch, the flattened gradient of the trainable
parameters in ``on_before_optimizer_step`` (after DDP's all-reduce) and, after ``fit``, the
epoch metrics in ``trainer.callback_metrics``; a logger keeps the step metrics (PPO).

Why equality is expected. ``WeightedDistributedSampler`` pads an uneven split like torch's
``DistributedSampler`` (7 rows, 2 ranks: 4 + 4 rows, one a repeat) but the repeat has
``sample_weight`` 0. Each rank's loss is ``global_weighted_mean``: ``sum(w·l) · world / sum over
ranks of w``, so the mean over ranks of the returned losses is the loss of all 7 real rows, and
DDP's averaged gradient is the gradient of that global mean: the one-process gradient. Metrics are
weighted means over ranks, so the validation metrics (5 rows: 3 + 3 with one repeat) are the
one-process ones, and after one equal SGD step so are the weights they are measured with. Only
float summation order differs, hence small explicit tolerances. An even split (8 training rows,
6 validation rows) must have no weight-0 row at all.

PPO (RLOO, 2 samples per prompt, one minibatch, one PPO epoch, 2 rollouts of the same 5 prompts: one
process with a batch of 5, two ranks with 3 each, one a weight-0 repeat). Rollouts are random and
seeded per rank, so ``prefl.generation.rollout.generate_sampled`` is replaced by a sampler that is a
function of the prompt alone: each row is generated on its own, from its unpadded prompt tokens,
under ``torch.manual_seed(f(prompt tokens, copy index))`` (a prompt's ``k`` rows are consecutive:
copy index = row % k), then cut by an EOS at a position drawn from the same seed (mixed lengths
exercise the masks) and right-padded to ``max_new_tokens``. Both runs then score the same responses.
Advantages are whitened (the default) with statistics over every rank's rollout (``global_whiten``),
as one batch would be. RLOO works within a prompt's group, the padding repeat's responses get mask 0
(no loss, no statistics), and the loss token means are global, so both policy gradients and the
exact global means logged (``ppo/score``, ``ppo/kl``, ...) must agree. The second rollout follows
one SGD step, so its KL to the reference is non-zero."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DistributedSampler

from prefl.data.collate import PreferenceCollator
from prefl.data.sampling import MarkedDataset, WeightedDistributedSampler
from prefl.functional import global_weighted_mean

SCRIPT = textwrap.dedent(
    """
    '''Runs for tests/modules/test_data_parallel.py: `python script.py OUT SFT DATA` runs them all
    under 2-process DDP; the test imports this file and calls `run(..., devices=1)` itself.'''
    import json
    import sys
    import zlib
    from contextlib import nullcontext
    from pathlib import Path
    from unittest import mock

    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.loggers import Logger

    import prefl.generation.rollout
    from prefl import (
        DPOModule,
        KTOModule,
        OnlineDPOModule,
        PPOModule,
        PreferenceDataModule,
        RewardModule,
    )
    from prefl.tasks import toy

    K = 2  # PPO samples per prompt
    NEW_TOKENS = 6
    #: run name -> (module, data folder, epochs)
    RUNS = {
        "dpo_uneven": ("dpo", "pairs7", 1),
        "dpo_even": ("dpo", "pairs8", 1),
        "dpo_uneven_grouped": ("dpo", "pairs7", 1),  # group_by_length=True (name suffix)
        "reward_uneven": ("reward", "pairs7", 1),
        "dpo_uneven_packed": ("dpo", "pairs7", 1),  # packing + share_prompt (name suffix)
        "reward_uneven_packed": ("reward", "pairs7", 1),
        "kto_uneven": ("kto", "unpaired7", 1),
        "online_dpo_uneven": ("online_dpo", "prompts5v", 1),
        "ppo_uneven": ("ppo", "prompts5", 2),
    }
    #: batch size per rank: one process takes the whole training set in one batch
    BATCH = {
        1: {"pairs": 8, "prompts": 5, "unpaired": 8},
        2: {"pairs": 4, "prompts": 3, "unpaired": 4},
    }
    ORIGINAL_GENERATE = prefl.generation.rollout.generate_sampled


    def write_data(root):
        '''Explicit prompt/chosen/rejected pairs (7 or 8 train, 5 or 6 validation) and 5 prompts.'''
        files = {
            "pairs7/train.jsonl": toy.pair_rows(7, seed=11),
            "pairs7/validation.jsonl": toy.pair_rows(5, seed=12, held_out=True),
            "pairs8/train.jsonl": toy.pair_rows(8, seed=13),
            "pairs8/validation.jsonl": toy.pair_rows(6, seed=14, held_out=True),
            "prompts5/train.jsonl": [{"prompt": p} for p in toy.all_prompts()[::17][:5]],
            "prompts5v/train.jsonl": [{"prompt": p} for p in toy.all_prompts()[::19][:5]],
            "prompts5v/validation.jsonl": [{"prompt": p} for p in toy.all_prompts()[5::23][:3]],
            "unpaired7/train.jsonl": labelled(toy.pair_rows(4, seed=15))[:7],
            "unpaired7/validation.jsonl": labelled(toy.pair_rows(3, seed=16, held_out=True))[:5],
        }
        for name, rows in files.items():
            path = Path(root) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\\n" for r in rows))


    def labelled(pairs):
        '''Pairs as labelled rows: chosen desirable, rejected undesirable.'''
        rows = []
        for r in pairs:
            rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
        return rows


    def per_prompt_generate(model, input_ids, attention_mask, max_new_tokens, temp, pad, eos):
        '''generate_sampled, but each row sampled alone from its unpadded prompt under a seed
        that depends on the prompt's tokens and the copy index only, then cut by an EOS at a
        seeded position (none when it falls past the end) and right-padded.'''
        rows = []
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            prompt = ids[mask.bool()][None]
            seed = zlib.crc32(str(prompt.tolist()).encode()) * K + i % K
            torch.manual_seed(seed)
            new = ORIGINAL_GENERATE(
                model, prompt, torch.ones_like(prompt), max_new_tokens, temp, pad, eos
            )[0]
            cut = int(torch.randint(1, max_new_tokens + 3, ()))
            if cut <= len(new):
                new = torch.cat([new[: cut - 1], new.new_full((1,), eos)])
            rows.append(torch.cat([new, new.new_full((max_new_tokens - len(new),), pad)]))
        return torch.stack(rows)


    class Memory(Logger):
        '''Keeps every logged step (on every rank).'''

        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append({k: float(v) for k, v in metrics.items()})


    def weights(batch):
        w = batch.get("sample_weight")
        return None if w is None else w.tolist()


    class Record(Callback):
        '''Per rank: returned losses, sample weights, gradients (files), final metrics.'''

        def __init__(self, out, memory):
            self.out, self.memory = out, memory
            self.data = {"losses": [], "train_weights": [], "val_weights": [], "steps": 0}

        def on_train_start(self, trainer, pl_module):
            self.data["rank"], self.data["world"] = trainer.global_rank, trainer.world_size
            self.data["sampler"] = type(trainer.train_dataloader.sampler).__name__
            params = [p.detach().flatten() for p in pl_module.parameters() if p.requires_grad]
            torch.save(torch.cat(params), self.out / f"init_rank{trainer.global_rank}.pt")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if outputs and "loss" in outputs:  # automatic optimisation: what training_step returned
                self.data["losses"].append(float(outputs["loss"]))
            self.data["train_weights"].append(weights(batch))

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
            self.data["val_weights"].append(weights(batch))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [
                torch.zeros(p.numel()) if p.grad is None else p.grad.detach().flatten()
                for p in pl_module.parameters()
                if p.requires_grad
            ]
            step, rank = self.data["steps"], trainer.global_rank
            torch.save(torch.cat(grads), self.out / f"grad{step}_rank{rank}.pt")
            self.data["steps"] += 1

        def on_fit_end(self, trainer, pl_module):
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.data["metrics"] = {k: v for k, v in metrics.items() if not k.endswith("_step")}
            self.data["logged"] = [r for r in self.memory.rows if "ppo/score" in r]
            path = self.out / f"rank{trainer.global_rank}.json"
            path.write_text(json.dumps(self.data))


    def sgd(params):
        return torch.optim.SGD(params, lr=0.5)


    def run(name, out, sft, data_root, devices):
        '''Fit run `name` on `devices` CPU processes; results go to out/name.'''
        kind, folder, epochs = RUNS[name]
        out = Path(out) / name
        out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        seed_everything(0)
        if kind == "dpo":
            module = DPOModule(sft, optimizer=sgd, lr_scheduler=None)
        elif kind == "reward":
            module = RewardModule(sft, optimizer=sgd, lr_scheduler=None)
        elif kind == "kto":
            module = KTOModule(sft, optimizer=sgd, lr_scheduler=None)
        elif kind == "online_dpo":
            module = OnlineDPOModule(
                sft,
                reward_fns=["toy"],
                num_samples=K,
                max_new_tokens=NEW_TOKENS,
                no_eos_score=None,
                optimizer=sgd,
                lr_scheduler=None,
            )
        else:
            module = PPOModule(
                sft,
                reward_fns=["toy"],
                advantage_estimator="rloo",
                num_samples=K,
                max_new_tokens=NEW_TOKENS,
                kl_coef=0.05,
                no_eos_score=None,
                whiten_advantages=True,  # over all ranks: shard-invariant
                ppo_epochs=1,
                max_grad_norm=None,  # record the raw gradient
                log_samples_every=0,
                optimizer=sgd,
            )
        mode = {"ppo": "prompts", "online_dpo": "prompts", "kto": "unpaired"}.get(kind, "pairs")
        data = PreferenceDataModule(
            str(Path(data_root) / folder),
            mode=mode,
            batch_size=BATCH[devices][mode],
            max_length=32,
            max_prompt_length=16,
            cache_dir=str(Path(data_root) / "cache"),
            group_by_length=name.endswith("_grouped"),
            packing=name.endswith("_packed"),
            share_prompt=name.endswith("_packed"),
        )
        memory = Memory()
        trainer = Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_epochs=epochs,
            num_sanity_val_steps=0,
            limit_val_batches=0 if kind == "ppo" else None,
            logger=memory,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
            callbacks=[Record(out, memory)],
        )
        patch = nullcontext()
        if kind in ("ppo", "online_dpo"):
            patch = mock.patch.object(
                prefl.generation.rollout, "generate_sampled", per_prompt_generate
            )
        with patch:
            trainer.fit(module, datamodule=data)


    if __name__ == "__main__":
        for name in RUNS:
            run(name, sys.argv[1], sys.argv[2], sys.argv[3], devices=2)
    """
)

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def runs(sft_dir, tmp_path_factory):
    """Every run on one process (in this process) and on two DDP ranks (one subprocess);
    returns ``{"single": out, "ddp": out}`` folders."""
    root = tmp_path_factory.mktemp("data_parallel")
    script = root / "data_parallel_runs.py"
    script.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("data_parallel_runs", script)
    runs_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runs_module)
    data_root = root / "data"
    runs_module.write_data(data_root)

    single = root / "single"
    for name in runs_module.RUNS:
        runs_module.run(name, single, sft_dir, data_root, devices=1)

    ddp = root / "ddp"
    # a session of its own, so that a hang kills the Lightning-launched rank 1 too
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ddp), sft_dir, str(data_root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"2-process DDP runs hung (> {TIMEOUT_S} s); stderr tail:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return {"single": single, "ddp": ddp}


def load_run(out, name, world):
    """Per-rank records and gradients of run ``name``."""
    records = [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, record in enumerate(records):
        assert (record["rank"], record["world"]) == (rank, world)
        steps = range(record["steps"])
        record["grads"] = [
            torch.load(out / name / f"grad{s}_rank{rank}.pt", weights_only=True) for s in steps
        ]
        record["init"] = torch.load(out / name / f"init_rank{rank}.pt", weights_only=True)
    return records


def assert_same_gradient(ddp, single, what):
    """Equal up to float summation order: 1e-5 of the gradient's largest entry."""
    scale = single.abs().max().item()
    assert scale > 0, what
    torch.testing.assert_close(ddp, single, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def check_pair_run(runs, name, n_train, n_val):
    """One SGD step + validation on pairs: sampler, weights, loss, gradient and metrics."""
    (single,) = load_run(runs["single"], name, 1)
    ddp = load_run(runs["ddp"], name, 2)

    # one process: the seeded (resumable) single-replica sampler, no sample_weight key
    assert single["sampler"] == "WeightedDistributedSampler"
    assert single["train_weights"] == [None] and single["val_weights"] == [None]
    # two ranks: one batch each, the padding repeats (if any) weigh 0 and are not counted
    assert [r["sampler"] for r in ddp] == ["WeightedDistributedSampler"] * 2
    for split, n in (("train_weights", n_train), ("val_weights", n_val)):
        weights = [w for r in ddp for batch in r[split] for w in batch]
        assert all(len(r[split]) == 1 for r in ddp), split
        assert len(weights) == 2 * -(-n // 2), split  # padded to equal halves
        assert sum(weights) == n, split  # every real row once
        assert set(weights) <= {0.0, 1.0}, split
        assert weights.count(0.0) == n % 2, split

    # the mean over ranks of the returned losses is the one-process loss over all real rows
    (single_loss,) = single["losses"]
    ddp_losses = [r["losses"][0] for r in ddp]
    assert sum(ddp_losses) / 2 == pytest.approx(single_loss, abs=1e-6)

    # same start, same gradient (after DDP's all-reduce), identical on both ranks
    assert single["steps"] == 1 and all(r["steps"] == 1 for r in ddp)
    for r in ddp:
        torch.testing.assert_close(r["init"], single["init"], rtol=0, atol=0)
    torch.testing.assert_close(ddp[0]["grads"][0], ddp[1]["grads"][0], rtol=0, atol=0)
    assert_same_gradient(ddp[0]["grads"][0], single["grads"][0], name)

    # every epoch metric (train: before the step; val: after it) equals the one-process value
    names = set(single["metrics"])
    assert any(k.startswith("val/") for k in names) and any(k.startswith("train/") for k in names)
    for r in ddp:
        assert set(r["metrics"]) == names
        for key, value in single["metrics"].items():
            assert r["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-5), (name, key)
    return single, ddp


@pytest.mark.slow
def test_dpo_uneven_split_matches_one_process(runs):
    single, ddp = check_pair_run(runs, "dpo_uneven", n_train=7, n_val=5)
    # policy == reference at the step: every pair's loss is log 2, and each rank returns its
    # share log 2 · world · (its real rows) / 7, so 4 + 3 rows give 8/7 and 6/7 of log 2
    for r in ddp:
        real = sum(r["train_weights"][0])
        assert r["losses"][0] == pytest.approx(math.log(2) * 2 * real / 7, abs=1e-6)
    assert single["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    keys = {"val/loss", "val/rewards/margins", "val/rewards/accuracies", "val/logps/chosen"}
    assert keys <= set(single["metrics"])
    # the step moved the policy: validation is no longer the log 2 of policy == reference
    assert abs(single["metrics"]["val/rewards/margins"]) > 1e-4


@pytest.mark.slow
def test_dpo_even_split_matches_one_process(runs):
    check_pair_run(runs, "dpo_even", n_train=8, n_val=6)


@pytest.mark.slow
def test_dpo_length_grouped_uneven_split_matches_one_process(runs):
    """Length grouping reorders which rows each rank gets, but every real row still counts once:
    loss, gradient and metrics stay the one-process ones."""
    check_pair_run(runs, "dpo_uneven_grouped", n_train=7, n_val=5)


@pytest.mark.slow
def test_reward_uneven_split_matches_one_process(runs):
    single, _ = check_pair_run(runs, "reward_uneven", n_train=7, n_val=5)
    keys = {"val/loss", "val/accuracy", "val/margin", "val/reward_mean", "val/reward_std"}
    assert keys <= set(single["metrics"])
    assert {"train/loss", "train/accuracy", "train/reward_mean"} <= set(single["metrics"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo_uneven_packed", "reward_uneven_packed"])
def test_packed_shared_layout_matches_one_process(runs, name):
    """Packed, prompt-shared batches: each rank packs its own rows, the padding repeat (weight 0)
    among them; loss, gradient and metrics stay the one-process ones, and equal the padded
    run's (the same rows, another layout)."""
    single, _ = check_pair_run(runs, name, n_train=7, n_val=5)
    (padded,) = load_run(runs["single"], name.removesuffix("_packed"), 1)
    assert single["losses"] == pytest.approx(padded["losses"], rel=1e-5)
    assert_same_gradient(single["grads"][0], padded["grads"][0], f"{name} vs padded")


@pytest.mark.slow
def test_online_dpo_uneven_split_matches_one_process(runs):
    """Online DPO on 5 prompts (one rank gets a weight-0 repeat), each sampled as a function of
    the prompt alone (see the module docstring): the same pairs, hence the same loss, gradient
    and metrics (the samples' score, KL, EOS rate and ties included) as one process."""
    single, _ = check_pair_run(runs, "online_dpo_uneven", n_train=5, n_val=3)
    assert {"train/online/score", "val/online/ties", "val/rewards/accuracies"} <= set(
        single["metrics"]
    )


@pytest.mark.slow
def test_kto_uneven_split_matches_one_process(runs):
    """KTO on 7 labelled rows: one rank gets a weight-0 repeat; the loss, gradient and metrics
    (the reference point z over every rank's real rows) stay the one-process ones."""
    single, _ = check_pair_run(runs, "kto_uneven", n_train=7, n_val=5)
    assert {"val/kl", "val/rewards/chosen", "val/rewards/rejected"} <= set(single["metrics"])


#: PPO quantities logged as exact global means (per-response ones, and token means taken over
#: the whole minibatch of every rank)
PPO_EXACT = (
    "ppo/score",
    "ppo/score_raw",
    "ppo/reward",
    "ppo/kl",
    "ppo/response_length",
    "ppo/eos_rate",
    "ppo/policy_loss",
    "ppo/entropy",
    "ppo/approx_kl",
    "ppo/clip_frac",
    "ppo/advantage_mean",
)


@pytest.mark.slow
def test_ppo_uneven_split_matches_one_process(runs):
    (single,) = load_run(runs["single"], "ppo_uneven", 1)
    ddp = load_run(runs["ddp"], "ppo_uneven", 2)

    assert single["train_weights"] == [None, None]
    for epoch in range(2):  # 5 prompts -> 3 + 3, one a weight-0 repeat, in each rollout
        weights = [w for r in ddp for w in r["train_weights"][epoch]]
        assert sorted(weights) == [0.0] + [1.0] * 5

    # two rollouts, one optimizer step each; the policy gradients agree
    assert single["steps"] == 2 and all(r["steps"] == 2 for r in ddp)
    for step in range(2):
        torch.testing.assert_close(ddp[0]["grads"][step], ddp[1]["grads"][step], rtol=0, atol=0)
        assert_same_gradient(ddp[0]["grads"][step], single["grads"][step], f"ppo step {step}")

    # the logged global means agree, on both ranks
    assert len(single["logged"]) == 2
    for r in ddp:
        assert len(r["logged"]) == 2
        for step, (got, want) in enumerate(zip(r["logged"], single["logged"], strict=True)):
            assert set(PPO_EXACT) <= set(want) and set(got) == set(want)
            for key in sorted(k for k in want if k.startswith("ppo/")):
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-5), (key, step)
    first, second = single["logged"]
    assert first["ppo/kl"] == 0.0  # policy == reference at the first rollout
    assert abs(second["ppo/kl"]) > 1e-4  # ... but not after one SGD step
    assert 0.0 < first["ppo/eos_rate"] < 1.0  # mixed lengths: the masks matter


# --- the sampler, the marked dataset and the weighted mean, in-process ---------------------------


def rank_indices(n, world=2, shuffle=True, seed=3, epoch=0):
    """Each rank's indices from a ``WeightedDistributedSampler`` over ``n`` rows."""
    out = []
    for rank in range(world):
        sampler = WeightedDistributedSampler(list(range(n)), world, rank, shuffle, seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_sampler_marks_the_one_padding_repeat_of_an_uneven_split():
    n = 7
    ranks = rank_indices(n)
    assert [len(r) for r in ranks] == [4, 4]
    flat = [i for r in ranks for i in r]
    marked = [i for i in flat if i >= n]
    assert len(marked) == 1
    assert sorted(i for i in flat if i < n) == list(range(n))  # every real row exactly once
    assert marked[0] - n in flat  # a repeat of a real row
    # the same rows and padding as torch's DistributedSampler (same seed, same shuffle)
    for rank, indices in enumerate(ranks):
        torch_sampler = DistributedSampler(list(range(n)), 2, rank, shuffle=True, seed=3)
        assert [i % n for i in indices] == list(torch_sampler)
    # the ranks share one permutation: interleaved, they give it back
    order = [ranks[i % 2][i // 2] for i in range(8)]
    assert order[:n] == torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    # a new epoch, a new order; no shuffle, row order
    assert rank_indices(n, epoch=1) != ranks
    assert rank_indices(n, shuffle=False) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_sampler_even_split_has_no_repeat_and_one_row_gives_a_repeat():
    ranks = rank_indices(8)
    assert [len(r) for r in ranks] == [4, 4]
    assert sorted(ranks[0] + ranks[1]) == list(range(8))
    assert rank_indices(1) == [[0], [1]]  # rank 1 holds only the (marked) repeat of row 0


def test_marked_dataset_weights_and_collated_sample_weight():
    rows = [{"prompt_ids": [2, 10 + i], "prompt": f"p{i}"} for i in range(3)]
    marked = MarkedDataset(rows)
    assert len(marked) == 3
    assert marked[1] == {**rows[1], "sample_weight": 1.0}
    assert marked[4] == {**rows[1], "sample_weight": 0.0}  # the repeat of row 1
    assert "sample_weight" not in rows[1]  # the source rows are untouched
    batch = PreferenceCollator(pad_token_id=0, mode="prompts")([marked[i] for i in (0, 2, 3)])
    assert batch["sample_weight"].dtype == torch.float32
    assert batch["sample_weight"].tolist() == [1.0, 1.0, 0.0]
    assert "sample_weight" not in PreferenceCollator(0, "prompts")(rows)


def test_global_weighted_mean_on_one_process_is_the_weighted_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0])
    loss = global_weighted_mean(values, weights)
    assert loss.item() == pytest.approx((1 + 2 + 4) / 3)  # row 3 weighs 0
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([1, 1, 0, 1]) / 3.0)
    assert global_weighted_mean(values.detach()).item() == pytest.approx(2.5)  # no weights
