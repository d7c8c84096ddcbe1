"""Pure loss functions (torch only), one function per variant behind a name table."""

from prefl.losses.dpo import (
    DPO_LOSSES,
    REFERENCE_FREE,
    DPOLoss,
    DPOSettings,
    DPOSettingsError,
    dpo_loss,
    dpo_loss_terms,
    implicit_rewards,
)
from prefl.losses.kto import KTO_LOSSES, kto_loss
from prefl.losses.ppo import clipped_policy_loss, clipped_value_loss
from prefl.losses.reward import bradley_terry_loss, reward_accuracy
from prefl.losses.sft import sft_loss

__all__ = [
    "DPO_LOSSES",
    "REFERENCE_FREE",
    "DPOLoss",
    "DPOSettings",
    "DPOSettingsError",
    "KTO_LOSSES",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "dpo_loss",
    "dpo_loss_terms",
    "implicit_rewards",
    "kto_loss",
    "reward_accuracy",
    "sft_loss",
]
