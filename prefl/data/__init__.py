"""Data: the PreferenceDataModule, row formats, tokenization, collators and tokenizers (the toy one
included)."""

from prefl.data.collate import PreferenceCollator
from prefl.data.datamodule import PreferenceDataModule
from prefl.data.formats import Columns, RowError
from prefl.data.tokenizers import build_toy_tokenizer, load_tokenizer
from prefl.data.validate import DataFileError

__all__ = [
    "Columns",
    "DataFileError",
    "PreferenceCollator",
    "PreferenceDataModule",
    "RowError",
    "build_toy_tokenizer",
    "load_tokenizer",
]
