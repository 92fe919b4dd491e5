"""TFDS datasets read with `tfds.data_source` from prepared array_record files: no TensorFlow at
run time. Preparing (download and convert, once) needs TensorFlow: `pip install -e ".[prepare]"`,
then `python -m stabench data NAME --prepare`.

Images come as uint8 and are normalized on the device with the training split's per-channel mean
and std. Text is tokenized by UTF-8 byte (token = byte + 1, 0 pads), cut or padded to `seq_len`:
no vocabulary to build or cache, the byte-level setup of Long Range Arena's text task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .dataset import DATASETS, DataMissing, Dataset, Meta, Source
from ..registry import UserError

FILE_FORMAT = "array_record"
BYTE_VOCAB = 257  # 256 byte values shifted by one, and the padding token 0
INSTALL = 'pip install -e ".[prepare]"'  # TensorFlow, needed only to prepare


@dataclass(frozen=True)
class TfdsInfo:
    n_train: int
    n_test: int
    num_classes: int
    download: str  # approximate download size, for the instructions
    image_shape: tuple[int, ...] = ()
    text_fields: tuple[str, ...] = ()


INFO = {
    "cifar10": TfdsInfo(50000, 10000, 10, "163 MB", image_shape=(32, 32, 3)),
    "cifar100": TfdsInfo(50000, 10000, 100, "161 MB", image_shape=(32, 32, 3)),
    "mnist": TfdsInfo(60000, 10000, 10, "11 MB", image_shape=(28, 28, 1)),
    "fashion_mnist": TfdsInfo(60000, 10000, 10, "30 MB", image_shape=(28, 28, 1)),
    "imdb_reviews": TfdsInfo(25000, 25000, 2, "80 MB", text_fields=("text",)),
    "ag_news_subset": TfdsInfo(120000, 7600, 4, "11 MB", text_fields=("title", "description")),
}


def resolve_data_dir(data_dir: str | None) -> tuple[str, str]:
    """The TFDS data directory and where that choice came from: --data-dir, $TFDS_DATA_DIR, or
    TFDS's default ~/tensorflow_datasets."""
    if data_dir:
        return os.path.expanduser(data_dir), "--data-dir"
    if os.environ.get("TFDS_DATA_DIR"):
        return os.path.expanduser(os.environ["TFDS_DATA_DIR"]), "$TFDS_DATA_DIR"
    return os.path.expanduser(os.path.join("~", "tensorflow_datasets")), "the TFDS default"


@contextlib.contextmanager
def _tidy_tfds():
    """TFDS logs a warning for every directory it probes (our own message says what matters), and
    each time it builds a dataset's description without the data it fetches the description into
    a new temporary directory it never removes: those land in one that is removed here."""
    logger = logging.getLogger("absl")
    level, tempdir = logger.level, tempfile.tempdir
    logger.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="stabench-tfds-") as scratch:
            tempfile.tempdir = scratch
            yield
    finally:
        tempfile.tempdir = tempdir
        logger.setLevel(level)


def status(name: str, data_dir: str | None = None) -> tuple[str | None, str]:
    """(path of the prepared dataset or None, one sentence on what was found)."""
    import tensorflow_datasets as tfds

    directory, origin = resolve_data_dir(data_dir)
    with _tidy_tfds():
        builder = tfds.builder(name, data_dir=directory)  # the format found there, if any
        path = str(builder.data_path)
        if not builder.is_prepared():
            elsewhere = ("" if origin == "--data-dir"
                         else "; --data-dir or $TFDS_DATA_DIR look elsewhere")
            return None, f"looked in {path} ({origin}{elsewhere})"
        found = builder.info.file_format
    if found is None or found.value != FILE_FORMAT:
        return None, (f"found it in {path} in {found.value if found else 'an unknown'} format, but "
                      f"stabench reads the {FILE_FORMAT} format without TensorFlow")
    return path, f"prepared in {path}"


def prepare_commands(name: str, data_dir: str | None = None) -> list[str]:
    directory, origin = resolve_data_dir(data_dir)
    flag = f" --data-dir {directory}" if origin == "--data-dir" else ""
    return [INSTALL, f"python -m stabench data {name} --prepare{flag}"]


def missing(name: str, data_dir: str | None = None) -> DataMissing:
    _, found = status(name, data_dir)
    install, prep = prepare_commands(name, data_dir)
    return DataMissing(
        f"dataset {name} is not prepared here: {found}. Get it ({INFO[name].download} download) "
        f"with `{install}` then `{prep}`, or run the same task on synthetic data with --fake-data")


def describe(name: str, data_dir: str | None = None) -> str:
    path, found = status(name, data_dir)
    if path is not None:
        return f"{name}: {found}, ready (no TensorFlow needed to read it)."
    install, prep = prepare_commands(name, data_dir)
    directory, _ = resolve_data_dir(data_dir)
    return "\n".join([
        f"{name}: not prepared here; {found}.",
        f"To prepare it once ({INFO[name].download} download, then read offline without "
        f"TensorFlow):",
        f"  {install}",
        f"  {prep}",
        f"or with the TFDS command line: tfds build {name} --file_format={FILE_FORMAT} "
        f"--data_dir={directory}",
        "Without the data, --fake-data runs any task on random inputs of the same shapes.",
    ])


def prepare(name: str, data_dir: str | None = None) -> str:
    """Download and convert to array_record (needs TensorFlow and the network); returns the path."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise UserError(f"preparing {name} needs TensorFlow (only for this step): `{INSTALL}`, "
                        "then rerun") from None
    import tensorflow_datasets as tfds

    directory, _ = resolve_data_dir(data_dir)
    builder = tfds.builder(name, data_dir=directory, file_format=FILE_FORMAT)
    builder.download_and_prepare()
    return str(builder.data_path)


def _read_splits(name: str, data_dir: str | None):
    """The train and test splits as random-access sources, or DataMissing when not prepared."""
    import tensorflow_datasets as tfds

    directory, _ = resolve_data_dir(data_dir)
    with _tidy_tfds():
        try:
            return tfds.data_source(name, split=["train", "test"], data_dir=directory,
                                    download=False, builder_kwargs={"file_format": FILE_FORMAT})
        except Exception:
            if status(name, data_dir)[0] is None:
                raise missing(name, data_dir) from None
            raise


def _records(source):
    # One index at a time: tfds.testing.mock_data does not implement batched reads.
    with _tidy_tfds():  # TFDS logs which image decoder it picked
        return [source[i] for i in range(len(source))]


def tokenize_bytes(text: str, seq_len: int) -> np.ndarray:
    """UTF-8 bytes + 1, truncated to seq_len and padded with 0."""
    ids = np.frombuffer(text.encode("utf-8"), np.uint8)[:seq_len].astype(np.int32) + 1
    return np.pad(ids, (0, seq_len - len(ids)))


def _image_source(name: str, info: TfdsInfo) -> Source:
    meta = Meta(x_shape=info.image_shape, x_dtype="uint8", num_outputs=info.num_classes,
                n_train=info.n_train, n_test=info.n_test)

    def load(data_dir=None) -> Dataset:
        splits = []
        for source in _read_splits(name, data_dir):
            recs = _records(source)
            splits.append((np.stack([r["image"] for r in recs]).astype(np.uint8),
                           np.array([r["label"] for r in recs], np.int32)))
        (x_tr, y_tr), (x_te, y_te) = splits
        pixels = x_tr.reshape(-1, x_tr.shape[-1]).astype(np.float64)
        mean, std = pixels.mean(0), pixels.std(0)
        return Dataset(meta, x_tr, y_tr, x_te, y_te, mean=mean.astype(np.float32),
                       std=np.maximum(std, 1e-3).astype(np.float32))

    return Source(name, meta, load, where=lambda data_dir: status(name, data_dir)[0], kind="tfds")


def _text_source(name: str, info: TfdsInfo, seq_len: int) -> Source:
    meta = Meta(x_shape=(seq_len,), x_dtype="int32", num_outputs=info.num_classes,
                n_train=info.n_train, n_test=info.n_test, vocab_size=BYTE_VOCAB)

    def load(data_dir=None) -> Dataset:
        splits = []
        for source in _read_splits(name, data_dir):
            recs = _records(source)
            texts = [" ".join(_text(r[f]) for f in info.text_fields) for r in recs]
            splits.append((np.stack([tokenize_bytes(t, seq_len) for t in texts]),
                           np.array([r["label"] for r in recs], np.int32)))
        (x_tr, y_tr), (x_te, y_te) = splits
        return Dataset(meta, x_tr, y_tr, x_te, y_te)

    return Source(name, meta, load, where=lambda data_dir: status(name, data_dir)[0], kind="tfds")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _register_image(name: str, help: str, ref: str) -> None:
    @DATASETS.register(name, help=help, ref=ref)
    def factory() -> Source:
        return _image_source(name, INFO[name])


def _register_text(name: str, help: str, ref: str, seq_len: int) -> None:
    def factory(seq_len: int = seq_len) -> Source:
        if seq_len <= 0:
            raise ValueError("seq_len must be positive")
        return _text_source(name, INFO[name], seq_len)

    DATASETS.register(name, help=help, ref=ref)(factory)


_register_image("cifar10", "CIFAR-10: 32x32 colour images, 10 classes (TFDS)",
                "Krizhevsky 2009")
_register_image("cifar100", "CIFAR-100: 32x32 colour images, 100 classes (TFDS)",
                "Krizhevsky 2009")
_register_image("mnist", "MNIST: 28x28 handwritten digits, 10 classes (TFDS)",
                "LeCun et al. 1998")
_register_image("fashion_mnist", "Fashion-MNIST: 28x28 clothing images, 10 classes (TFDS)",
                "Xiao et al. 2017")
_register_text("imdb_reviews", "IMDB movie reviews, sentiment (2 classes), byte tokens (TFDS)",
               "Maas et al. 2011; byte level as in Tay et al. 2021 (LRA)", seq_len=512)
_register_text("ag_news_subset", "AG News titles and descriptions, 4 topics, byte tokens (TFDS)",
               "Zhang et al. 2015", seq_len=256)
