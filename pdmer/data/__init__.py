"""Datasets: the embedded synthetic benchmark and the generic on-disk layout."""

from pdmer.data.types import LABELS, STEP_S, Curve, DataError, Dataset, Song

__all__ = ["LABELS", "STEP_S", "Curve", "DataError", "Dataset", "Song"]
