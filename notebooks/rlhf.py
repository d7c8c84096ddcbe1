# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # RLHF on the toy task: reward model, then PPO
#
# The InstructGPT recipe in three stages, all by import: SFT gives the starting policy; a
# **reward model** learns `r(prompt, completion)` from preference pairs (Bradley–Terry loss); then
# **PPO** optimises the policy against that reward, with a KL penalty that keeps it near the SFT
# model. Because the toy task has a known oracle reward, we can check how well the learned reward
# ranks answers and how much true reward PPO gains.
#
# Default settings follow `configs/toy/{sft,reward,ppo}.yaml` and reproduce the README's reward
# model and `ppo.yaml` figures; `PREFL_NB_SMALL=1` runs a quick smoke version. Outputs go to
# `$PREFL_NB_OUT` (default `notebooks_out/`).

# %%
"""RLHF on the toy task: reward model, then PPO (a notebook, or run it as a script)."""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from matplotlib.ticker import MaxNLocator
from torchmetrics.functional import spearman_corrcoef

from prefl import (
    CausalLMSpec,
    HFExport,
    PPOModule,
    PreferenceDataModule,
    RewardModel,
    RewardModule,
    SampleReport,
    SFTModule,
)
from prefl.generation.sample import sample_completions
from prefl.tasks import toy

SMALL = os.environ.get("PREFL_NB_SMALL", "") not in ("", "0")
OUT = Path(os.environ.get("PREFL_NB_OUT", "notebooks_out"))  # plots go here
RUNS = OUT / "rlhf"  # logs, checkpoints and exports go here
RUNS.mkdir(parents=True, exist_ok=True)

SFT_EPOCHS = 2 if SMALL else 4
REWARD_EPOCHS = 1 if SMALL else 2
MAX_SAMPLES = 256 if SMALL else None  # rows per split (None = the full toy splits)
PPO_STEPS = 5 if SMALL else 40  # rollouts at most (the toy train split holds 32 batches of 64)
PPO_BATCH = 16 if SMALL else 64  # prompts per rollout
EVAL_PROMPTS = toy.split_prompts()[1][::9] if SMALL else "toy"  # held-out prompts
EVAL_SAMPLES = 2 if SMALL else 8  # completions per prompt
print(f"small={SMALL}, writing to {OUT.resolve()}")


def trainer(name: str, callbacks: list, **kwargs) -> Trainer:
    """A CPU Trainer logging CSV metrics and checkpoints under RUNS/name."""
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(RUNS, name=name),
        default_root_dir=RUNS / name,
        callbacks=callbacks,
        enable_progress_bar=not SMALL,
        enable_model_summary=False,
        **kwargs,
    )


def data(mode: str, tokenizer: str, batch_size: int = 32) -> PreferenceDataModule:
    """The toy task's data module for one stage (``sft``, ``pairs`` or ``prompts``)."""
    return PreferenceDataModule(
        dataset="toy",
        tokenizer=tokenizer,
        mode=mode,
        max_length=32,
        max_prompt_length=16,
        batch_size=batch_size,
        max_samples=MAX_SAMPLES,
    )


# %% [markdown]
# ## 1. SFT: the starting policy
#
# Same as the quickstart (`configs/toy/sft.yaml`): a small random-init Llama trained on the toy
# corpus and exported as a Hugging Face directory.

# %%
seed_everything(0)
sft = SFTModule(
    CausalLMSpec(config="toy"),
    optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0),
)
sft_export = RUNS / "sft" / "export"
trainer("sft", [HFExport(str(sft_export))], max_epochs=SFT_EPOCHS, log_every_n_steps=20).fit(
    sft, datamodule=data("sft", "toy")
)

# %% [markdown]
# ## 2. The reward model
#
# `RewardModule` puts a scalar head on the SFT backbone and trains it on the oracle-labelled pairs
# with the Bradley–Terry loss `-logσ(r_chosen − r_rejected)`. The export also stores the reward
# mean and std on the validation pairs, which PPO uses to normalise scores.
#
# Does it rank answers like the true reward? Like `prefl.RewardReport`, score 1024 fresh
# completions for held-out prompts with the exported model and with the oracle, and compare the
# rankings (Spearman correlation).

# %%
seed_everything(0)
reward = RewardModule(
    str(sft_export),
    optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0),
    lr_scheduler=None,  # constant lr, as `prefl fit -c configs/toy/reward.yaml` runs it
)
reward_export = RUNS / "reward" / "export"
reward_trainer = trainer(
    "reward", [HFExport(str(reward_export))], max_epochs=REWARD_EPOCHS, log_every_n_steps=20
)
reward_trainer.fit(reward, datamodule=data("pairs", str(sft_export)))

# %%
reward_model = RewardModel.from_pretrained(reward_export)
rows = toy.sft_rows(256 if SMALL else 1024, seed=123, held_out=True)
prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
learned = torch.tensor(reward_model.score(prompts, completions), dtype=torch.float64)
oracle = torch.tensor(toy.oracle_rewards(prompts, completions), dtype=torch.float64)
spearman = float(spearman_corrcoef(learned, oracle))
print(f"reward model: Spearman {spearman:.3f} with the oracle on {len(rows)} held-out completions")
print(f"  held-out pair accuracy {float(reward_trainer.callback_metrics['val/accuracy']):.3f}")
print(f"  stored reward stats: {reward_model.stats}")

# %% [markdown]
# ## 3. PPO against the learned reward
#
# Each training step is one rollout: sample a response for each prompt of the batch, score it with
# the reward model (normalised), subtract `β·KL` to the reference per token, estimate advantages
# with GAE and the critic (initialised from the reward model), then run 4 epochs of clipped PPO
# updates over the rollout (`configs/toy/ppo.yaml`: β = 0.05, lr 5e-4, critic lr 1e-3).
#
# A small callback collects the per-step metrics the module logs (`ppo/score`, `ppo/kl`,
# `ppo/entropy`, ...) from `trainer.callback_metrics`.


# %%
class StepMetrics(Callback):
    """Collect chosen ``ppo/*`` metrics after every training step."""

    def __init__(self, keys=("ppo/score", "ppo/reward", "ppo/kl", "ppo/entropy")):
        self.keys, self.rows = keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Read this step's values from the metrics the module logged."""
        metrics = trainer.callback_metrics
        self.rows.append({k: float(metrics[k]) for k in self.keys if k in metrics})


seed_everything(0)
ppo = PPOModule(
    str(sft_export),
    reward_model=str(reward_export),
    advantage_estimator="gae",
    num_samples=1,
    max_new_tokens=16,
    kl_coef=0.05,
    ppo_epochs=4,
    mini_batch_size=min(32, PPO_BATCH),
    optimizer=lambda params: torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0),
    value_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0),
)
curves = StepMetrics()
ppo_report = SampleReport(
    EVAL_PROMPTS, num_samples=EVAL_SAMPLES, max_new_tokens=16, compare_reference=True
)
ppo_export = RUNS / "ppo" / "export"
trainer(
    "ppo",
    [HFExport(str(ppo_export)), ppo_report, curves],
    max_epochs=1,
    limit_train_batches=PPO_STEPS,
    log_every_n_steps=5,
).fit(ppo, datamodule=data("prompts", str(sft_export), batch_size=PPO_BATCH))

# %%
steps = list(range(1, len(curves.rows) + 1))
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
axes[0].plot(steps, [r["ppo/score"] for r in curves.rows], label="score (reward model)")
axes[0].plot(steps, [r["ppo/reward"] for r in curves.rows], label="score − β·KL")
axes[0].set_title("Reward")
axes[0].legend()
axes[1].plot(steps, [r["ppo/kl"] for r in curves.rows], color="C3")
axes[1].set_title("KL(policy ‖ reference), nats / response")
axes[2].plot(steps, [r["ppo/entropy"] for r in curves.rows], color="C2")
axes[2].set_title("Policy entropy, nats / token")
for ax in axes:
    ax.set_xlabel("PPO step (rollout)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
fig.suptitle("PPO on the toy task against the learned reward model")
fig.tight_layout()
fig.savefig(OUT / "rlhf_curves.png", dpi=120)
plt.show()

# %% [markdown]
# A healthy run: the score rises, the KL grows slowly to a few nats, and the entropy falls
# slowly without collapsing. The report printed at the end of `fit` measures the tuned policy
# with the *oracle*, which PPO never saw: its mean reward, the gain over the SFT model (the
# reference), and the KL paid.
#
# ## 4. Samples: reference (SFT) vs PPO policy
#
# The same held-out prompts and sampling seed for both models.

# %%
tokenizer = ppo.resolve_tokenizer()
shown = toy.split_prompts()[1][::9][:6]
policy_samples = sample_completions(ppo.model, tokenizer, shown, max_new_tokens=16, seed=0)
with ppo.reference_context() as reference:
    reference_samples = sample_completions(reference, tokenizer, shown, max_new_tokens=16, seed=0)
for prompt, ref, pol in zip(
    shown, reference_samples.completions, policy_samples.completions, strict=True
):
    print(prompt)
    print(f"  reference ({toy.oracle_reward(prompt, ref):+.2f}): {ref}")
    print(f"  PPO       ({toy.oracle_reward(prompt, pol):+.2f}): {pol}")
