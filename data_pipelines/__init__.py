"""Data for training: the bundled corpus and tokenizer (the embedded default), packed into sequences."""

from data_pipelines.packed import DataError, PackedTextData

__all__ = ["DataError", "PackedTextData"]
