"""Text a run reads: the built-in corpus, the user's files (.txt, .jsonl, .parquet, directories), train/eval
splits, calibration samples and evaluation windows."""

from leanlm.data.corpus import (
    Corpus,
    calibration_samples,
    default_corpus,
    load_corpus,
    load_texts,
    read_text,
)

__all__ = ["Corpus", "calibration_samples", "default_corpus", "load_corpus", "load_texts", "read_text"]
