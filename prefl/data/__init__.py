"""Data: the PreferenceDataModule, row formats, tokenization, collators and the toy task."""

from prefl.data.collate import PreferenceCollator
from prefl.data.datamodule import PreferenceDataModule
from prefl.data.formats import Columns, RowError
from prefl.data.validate import DataFileError

__all__ = ["Columns", "DataFileError", "PreferenceCollator", "PreferenceDataModule", "RowError"]
