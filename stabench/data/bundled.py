"""Datasets that ship with the installed packages and need no network (sklearn's digits)."""

from __future__ import annotations

import numpy as np

from .dataset import DATASETS, Dataset, Meta, Source

DIGITS_N, DIGITS_FEATURES = 1797, 64


@DATASETS.register("digits", help="sklearn 8x8 handwritten digits, 10 classes, bundled offline",
                   ref="Alpaydin & Kaynak 1998 (UCI optdigits)")
def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Source:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must lie in (0, 1)")
    n_test = int(round(DIGITS_N * test_fraction))
    meta = Meta(x_shape=(DIGITS_FEATURES,), x_dtype="float32", num_outputs=10,
                n_train=DIGITS_N - n_test, n_test=n_test)

    def load(data_dir=None) -> Dataset:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=n_test, random_state=split_seed, stratify=y)
        mean, std = x_tr.mean(0), x_tr.std(0)
        std = np.where(std > 1e-6, std, 1.0)  # constant border pixels
        scale = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
        return Dataset(meta, scale(x_tr), y_tr.astype(np.int32), scale(x_te), y_te.astype(np.int32))

    return Source("digits", meta, load)
