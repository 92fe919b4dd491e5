"""What a dataset is (Meta, Dataset), where one comes from (Source, the DATASETS registry), and
random data of a Meta's shapes (--fake-data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..registry import Registry, UserError

DATASETS = Registry("dataset")


@dataclass(frozen=True)
class Meta:
    """What a model and the engine need to know without loading the data."""

    x_shape: tuple[int, ...]  # one example
    x_dtype: str
    num_outputs: int  # classes, or regression outputs
    n_train: int
    n_test: int
    task_type: str = "classification"  # or "regression"
    y_shape: tuple[int, ...] = ()
    vocab_size: int = 0  # integer token inputs take values in [0, vocab_size); 0 = not tokens


@dataclass(frozen=True)
class Dataset:
    """Whole splits as numpy arrays; the engine puts them on the device once.

    Inputs stored as integers (images as uint8) are normalized on device with `mean` and `std`.
    """

    meta: Meta
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


class DataMissing(UserError):
    """The dataset is not prepared here; the message says where we looked and how to get it."""


@dataclass(frozen=True)
class Source:
    name: str
    meta: Meta
    load: Callable[[str | None], Dataset]  # data_dir -> Dataset; raises DataMissing
    where: Callable[[str | None], str | None] = field(default=lambda data_dir: "bundled")
    kind: str = "bundled"  # "bundled" | "generated" | "tfds" (prepared once, then read offline)

    def available(self, data_dir: str | None = None) -> bool:
        return self.where(data_dir) is not None

    def availability(self, data_dir: str | None = None) -> str:
        """One word for listings: bundled, generated, prepared or missing."""
        if self.kind != "tfds":
            return self.kind
        return "prepared" if self.available(data_dir) else "missing"

    def describe(self, data_dir: str | None = None) -> str:
        """Whether the data is here, where, and otherwise how to get it (several lines)."""
        if self.kind == "tfds":
            from .tfds import describe

            return describe(self.name, data_dir)
        how = "bundled with the installed packages" if self.kind == "bundled" else \
            "generated from a seed when a run starts"
        return f"{self.name}: {how}; nothing to prepare."


FAKE_MAX_TRAIN, FAKE_MAX_TEST = 8192, 1024


def fake_sizes(meta: Meta) -> tuple[int, int]:
    """Training and test examples of the task's --fake-data."""
    return min(meta.n_train, FAKE_MAX_TRAIN), min(meta.n_test, FAKE_MAX_TEST)


def fake(meta: Meta, seed: int = 0) -> Dataset:
    """Random data with the task's per-example shapes, dtypes and class count (--fake-data)."""
    rng = np.random.default_rng(seed)
    n_train, n_test = fake_sizes(meta)

    def inputs(n):
        shape = (n, *meta.x_shape)
        if meta.x_dtype == "uint8":
            return rng.integers(0, 256, shape, dtype=np.uint8)
        if meta.vocab_size:  # token 0 pads: real sequences have it only at their end
            return rng.integers(1, meta.vocab_size, shape).astype(meta.x_dtype)
        return rng.standard_normal(shape).astype(meta.x_dtype)

    def targets(n):
        if meta.task_type == "classification":
            return rng.integers(0, meta.num_outputs, (n, *meta.y_shape)).astype(np.int32)
        return rng.standard_normal((n, *meta.y_shape)).astype(np.float32)

    is_image = meta.x_dtype == "uint8"
    return Dataset(
        meta, inputs(n_train), targets(n_train), inputs(n_test), targets(n_test),
        mean=np.float32(127.5) if is_image else None, std=np.float32(64.0) if is_image else None,
    )


def check_finite(data: Dataset, name: str) -> Dataset:
    for split, arr in (("train", data.x_train), ("test", data.x_test),
                       ("train targets", data.y_train), ("test targets", data.y_test)):
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise UserError(f"dataset {name}: {split} contain NaN or Inf values")
    return data
