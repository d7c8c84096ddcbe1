"""Callbacks the Trainer calls: Hugging Face export and sample-quality reports."""

from prefl.callbacks.export import HFExport
from prefl.callbacks.samples import SampleReport, resolve_reward_fn

__all__ = ["HFExport", "SampleReport", "resolve_reward_fn"]
