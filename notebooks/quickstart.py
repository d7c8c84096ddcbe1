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
# # prefl quickstart: SFT, then DPO, on the toy task
#
# Supervised fine-tuning (SFT) teaches a model the *shape* of an answer; **preference tuning**
# teaches it the *choice* between two answers of that shape, learned from pairs where one reply
# is preferred to the other. DPO does this directly: a logistic loss on how much more the policy
# raises the chosen answer than the rejected one, each measured against a frozen copy of the SFT
# model (the *reference*).
#
# Everything here runs offline on CPU with the embedded toy task (short movie-review prompts and a
# known oracle reward: (positive − negative words) / words). With the default settings it
# reproduces the README's SFT and DPO figures; set `PREFL_NB_SMALL=1` for a quick smoke run.
# Outputs (checkpoints, exports, plots) go to `$PREFL_NB_OUT` (default `notebooks_out/`).

# %%
"""prefl quickstart: SFT, then DPO, on the toy task (a notebook, or run it as a script)."""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from prefl import (
    CausalLMSpec,
    DPOModule,
    HFExport,
    PreferenceDataModule,
    SampleReport,
    SFTModule,
)
from prefl.losses import implicit_rewards
from prefl.tasks import toy

SMALL = os.environ.get("PREFL_NB_SMALL", "") not in ("", "0")
OUT = Path(os.environ.get("PREFL_NB_OUT", "notebooks_out"))  # plots go here
RUNS = OUT / "quickstart"  # logs, checkpoints and exports go here
RUNS.mkdir(parents=True, exist_ok=True)

# Settings of configs/toy/sft.yaml and configs/toy/dpo.yaml; SMALL shrinks data and samples.
SFT_EPOCHS = 2 if SMALL else 4
MAX_SAMPLES = 256 if SMALL else None  # rows per split (None = the full toy splits)
EVAL_PROMPTS = toy.split_prompts()[1][::9] if SMALL else "toy"  # held-out prompts
EVAL_SAMPLES = 2 if SMALL else 8  # completions per prompt
print(f"small={SMALL}, writing to {OUT.resolve()}")


def trainer(name: str, max_epochs: int, callbacks: list) -> Trainer:
    """A CPU Trainer logging CSV metrics and checkpoints under RUNS/name."""
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        log_every_n_steps=20,
        logger=CSVLogger(RUNS, name=name),
        default_root_dir=RUNS / name,
        callbacks=callbacks,
        enable_progress_bar=not SMALL,
        enable_model_summary=False,
    )


# %% [markdown]
# ## 1. Supervised fine-tuning
#
# A 2-layer, 64-wide Llama (random init, `CausalLMSpec(config="toy")`) learns the toy corpus of
# prompt → completion rows. `HFExport` writes the result as a Hugging Face directory that the next
# stage loads by path. `SampleReport` samples from it on held-out prompts: an SFT model should
# reproduce its corpus's mean reward (the *target*), not improve on it.

# %%
seed_everything(0)
sft_data = PreferenceDataModule(
    dataset="toy",
    tokenizer="toy",
    mode="sft",
    max_length=32,
    max_prompt_length=16,
    batch_size=32,
    max_samples=MAX_SAMPLES,
)
sft = SFTModule(
    CausalLMSpec(config="toy"),
    optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0),
)
sft_export = RUNS / "sft" / "export"
sft_report = SampleReport(EVAL_PROMPTS, num_samples=EVAL_SAMPLES, max_new_tokens=16)
trainer("sft", SFT_EPOCHS, [HFExport(str(sft_export)), sft_report]).fit(sft, datamodule=sft_data)

# %% [markdown]
# ## 2. DPO from the SFT export
#
# The policy and its frozen reference both start from the export. Each batch holds preference
# pairs labelled by the oracle; the loss is `-logσ(β·d)` where `d` is the difference of the chosen
# and rejected log-ratios `log π − log π_ref` (β = 0.5, one epoch, as in `configs/toy/dpo.yaml`).
# `SampleReport(compare_reference=True)` then samples from policy and reference and reports the
# oracle reward gained and the KL(policy ‖ reference) paid for it.

# %%
BETA = 0.5
seed_everything(0)
pair_data = PreferenceDataModule(
    dataset="toy",
    tokenizer=str(sft_export),
    mode="pairs",
    max_length=32,
    max_prompt_length=16,
    batch_size=32,
    max_samples=MAX_SAMPLES,
)
dpo = DPOModule(
    str(sft_export),
    beta=BETA,
    loss_type="sigmoid",
    optimizer=lambda params: torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0),
    lr_scheduler=None,  # constant lr, as `prefl fit -c configs/toy/dpo.yaml` runs it
)
dpo_report = SampleReport(
    EVAL_PROMPTS, num_samples=EVAL_SAMPLES, max_new_tokens=16, compare_reference=True
)
dpo_export = RUNS / "dpo" / "export"
trainer("dpo", 1, [HFExport(str(dpo_export)), dpo_report]).fit(dpo, datamodule=pair_data)

# %% [markdown]
# ## 3. Implicit rewards on held-out pairs
#
# DPO's policy defines an *implicit reward* `r(x, y) = β·(log π(y|x) − log π_ref(y|x))`. On pairs
# from held-out prompts (the data module's `test` split), a well-tuned policy gives the chosen
# answer a higher implicit reward than the rejected one: the share of such pairs is the *pair
# accuracy* (the report above gives it on the validation split). `module(batch)` gives the
# policy's log-probs, `module.reference_logps(batch)` the reference's.

# %%
pair_data.setup("test")
dpo.eval()
chosen_rewards, rejected_rewards = [], []
with torch.no_grad():
    for batch in pair_data.test_dataloader():
        policy = dpo(batch)
        ref_chosen, ref_rejected = dpo.reference_logps(batch)
        chosen, rejected = implicit_rewards(
            policy["chosen_logps"], policy["rejected_logps"], ref_chosen, ref_rejected, beta=BETA
        )
        chosen_rewards.append(chosen)
        rejected_rewards.append(rejected)
chosen_rewards, rejected_rewards = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
margins = chosen_rewards - rejected_rewards
accuracy = (margins > 0).float().mean().item()
print(f"held-out pairs: {len(margins)}")
print(f"pair accuracy (implicit reward, chosen > rejected): {accuracy:.3f}")
print(
    f"mean implicit reward: chosen {chosen_rewards.mean():+.3f}, "
    f"rejected {rejected_rewards.mean():+.3f}, margin {margins.mean():+.3f}"
)

# %%
fig, (ax_rewards, ax_margin) = plt.subplots(1, 2, figsize=(11, 4))
bins = torch.linspace(
    float(torch.minimum(chosen_rewards.min(), rejected_rewards.min())),
    float(torch.maximum(chosen_rewards.max(), rejected_rewards.max())),
    31,
).tolist()
ax_rewards.hist(rejected_rewards.tolist(), bins=bins, alpha=0.6, label="rejected", color="C3")
ax_rewards.hist(chosen_rewards.tolist(), bins=bins, alpha=0.6, label="chosen", color="C2")
ax_rewards.set_xlabel("implicit reward β·(log π − log π_ref)")
ax_rewards.set_ylabel("held-out pairs")
ax_rewards.set_title("Chosen vs rejected")
ax_rewards.legend()
ax_margin.hist(margins.tolist(), bins=30, color="C0")
ax_margin.axvline(0.0, color="k", lw=1, ls="--")
ax_margin.set_xlabel("margin (chosen − rejected)")
ax_margin.set_title(f"Margins: pair accuracy {accuracy:.3f}")
fig.suptitle("DPO implicit rewards on held-out toy pairs")
fig.tight_layout()
fig.savefig(OUT / "quickstart_implicit_rewards.png", dpi=120)
plt.show()

# %% [markdown]
# The policy now prefers the oracle's choice on most held-out pairs, and its samples score far
# above the SFT model's (see the report above) at the price of a few nats of KL. The exports in
# `$PREFL_NB_OUT/quickstart/{sft,dpo}/export` load with `transformers.AutoModelForCausalLM`. Next:
# `rlhf.py` (reward model + PPO) and `frontier.py` (reward vs KL for DPO and PPO).
