"""Callbacks the Trainer calls: Hugging Face export, sample-quality, reward and entropy reports,
and the writer of sampled answers."""

from prefl.callbacks.entropy import EntropyReport
from prefl.callbacks.evaluation import EvalCallback
from prefl.callbacks.export import HFExport
from prefl.callbacks.rewards import RewardReport, RewardWriter
from prefl.callbacks.sample_writer import SampleWriter
from prefl.callbacks.samples import SampleReport

__all__ = [
    "EntropyReport",
    "EvalCallback",
    "HFExport",
    "RewardReport",
    "RewardWriter",
    "SampleReport",
    "SampleWriter",
]
