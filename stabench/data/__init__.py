"""Datasets: a registry of sources, each able to say whether its data is here and to load it."""

from . import bundled, synthetic, tfds  # noqa: F401  (registers the datasets)
from .dataset import (DATASETS, DataMissing, Dataset, Meta, Source, check_finite, fake,
                      fake_sizes, hold_out, split_sizes, with_validation)

__all__ = ["DATASETS", "DataMissing", "Dataset", "Meta", "Source", "check_finite", "fake",
           "fake_sizes", "hold_out", "split_sizes", "with_validation"]
