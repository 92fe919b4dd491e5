"""What a dataset is (Meta, Dataset), where one comes from (Source, the DATASETS registry), and
random data of a Meta's shapes (--fake-data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

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
    n_val: int = 0  # examples held out of the training split for validation (see hold_out)


@dataclass(frozen=True)
class Dataset:
    """Whole splits as numpy arrays; the engine puts them on the device once.

    Inputs stored as integers (images as uint8) are normalized on device with `mean` and `std`.
    The validation split (`x_val`, `y_val`) is None until `hold_out` takes it from the training
    split.
    """

    meta: Meta
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


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


# ---- the validation split ------------------------------------------------------------------------
# The held-out examples are drawn with this seed alone: the same split for every run seed, method
# and entry of a task.
VAL_SPLIT_SEED = 0


def split_sizes(n_train: int, fraction: float) -> tuple[int, int]:
    """(training, validation) examples when `fraction` of `n_train` is held out for validation:
    round(fraction * n_train) of them, and at least one example on each side."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"val_fraction must lie in (0, 1), got {fraction!r}")
    n_val = round(fraction * n_train)
    if not 0 < n_val < n_train:
        raise UserError(f"val_fraction={fraction!r} of {n_train} training examples leaves "
                        f"{n_val} for validation and {n_train - n_val} for training: each needs "
                        f"at least one")
    return n_train - n_val, n_val


def hold_out(data: Dataset, fraction: float) -> Dataset:
    """The dataset with `fraction` of its training examples moved to the validation split: a
    random subset drawn with VAL_SPLIT_SEED, both parts kept in their original order. The test
    split is untouched. Normalization statistics (`mean`, `std`) stay those the source computed
    on its whole training split: input statistics only, no labels, the same for every entry."""
    if data.x_val is not None:
        raise ValueError("the dataset already holds a validation split")
    n_fit, n_val = split_sizes(len(data.x_train), fraction)
    order = np.random.default_rng(VAL_SPLIT_SEED).permutation(len(data.x_train))
    fit, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    meta = replace(data.meta, n_train=n_fit, n_val=n_val)
    return replace(data, meta=meta, x_train=data.x_train[fit], y_train=data.y_train[fit],
                   x_val=data.x_train[val], y_val=data.y_train[val])


def with_validation(source: Source, fraction: float) -> Source:
    """The source whose data holds out `fraction` of its training split for validation; its meta
    counts the examples left for training (n_train) and held out (n_val)."""
    n_fit, n_val = split_sizes(source.meta.n_train, fraction)
    return replace(source, meta=replace(source.meta, n_train=n_fit, n_val=n_val),
                   load=lambda data_dir=None: hold_out(source.load(data_dir), fraction))


FAKE_MAX_TRAIN, FAKE_MAX_TEST = 8192, 1024


def fake_sizes(meta: Meta) -> tuple[int, int, int]:
    """Training, validation and test examples of the task's --fake-data."""
    return (min(meta.n_train, FAKE_MAX_TRAIN), min(meta.n_val, FAKE_MAX_TEST),
            min(meta.n_test, FAKE_MAX_TEST))


def fake(meta: Meta, seed: int = 0) -> Dataset:
    """Random data with the task's per-example shapes, dtypes and class count (--fake-data)."""
    rng = np.random.default_rng(seed)
    n_train, n_val, n_test = fake_sizes(meta)

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
        x_val=inputs(n_val) if n_val else None, y_val=targets(n_val) if n_val else None,
    )


def check_finite(data: Dataset, name: str) -> Dataset:
    for split, arr in (("train", data.x_train), ("test", data.x_test),
                       ("train targets", data.y_train), ("test targets", data.y_test),
                       ("validation", data.x_val), ("validation targets", data.y_val)):
        if arr is None:
            continue
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise UserError(f"dataset {name}: {split} contain NaN or Inf values")
    return data
