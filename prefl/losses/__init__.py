"""Pure loss functions (torch only), one function per variant."""

from prefl.losses.sft import sft_loss

__all__ = ["sft_loss"]
