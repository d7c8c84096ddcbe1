"""Data: the PreferenceDataModule, row formats, tokenization, collators and the toy task."""

from prefl.data.collate import PreferenceCollator
from prefl.data.datamodule import PreferenceDataModule
from prefl.data.formats import Columns, RowError

__all__ = ["Columns", "PreferenceCollator", "PreferenceDataModule", "RowError"]
