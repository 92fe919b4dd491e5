"""TFDS datasets without TensorFlow: reading prepared array_record files, the data directory
choice, the offline error for absent data, and the `data` command."""

import io
import json
import tempfile

import numpy as np
import pytest

from stabench.data import DATASETS, DataMissing
from stabench.data import tfds as stabench_tfds

from conftest import run_cli

TFDS_NAMES = sorted(stabench_tfds.INFO)


def write_prepared(name, data_dir, n_train=12, n_test=5, seed=0):
    """Prepare a small copy of a TFDS dataset in array_record format, as `tfds build` would, but
    from generated examples (no network, no TensorFlow: images go in already PNG-encoded).
    Returns the examples written, per split."""
    import tensorflow_datasets as tfds
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {"train": [], "test": []}

    def example(features, i):
        out = {}
        for key, feature in features.items():
            if isinstance(feature, tfds.features.Image):
                pixels = rng.integers(0, 256, feature.shape, dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels[..., 0] if feature.shape[-1] == 1 else pixels).save(
                    buf, format="PNG")
                buf.seek(0)
                out[key], out["_pixels"] = buf, pixels
            elif isinstance(feature, tfds.features.ClassLabel):
                out[key] = int(rng.integers(0, feature.num_classes))
            elif isinstance(feature, tfds.features.Text):
                out[key] = f"{key} {i} caf\u00e9 " + "x" * int(rng.integers(0, 40))
            else:
                out[key] = f"id{i}"
        return out

    def generate(split, n, features):
        for i in range(n):
            ex = example(features, i)
            written[split].append({k: v for k, v in ex.items() if not isinstance(v, io.BytesIO)})
            yield i, {k: v for k, v in ex.items() if k != "_pixels"}

    class Prepared(tfds.builder_cls(name), skip_registration=True):
        def _split_generators(self, dl_manager):
            return {"train": generate("train", n_train, self.info.features),
                    "test": generate("test", n_test, self.info.features)}

    Prepared.name = name
    with stabench_tfds._tidy_tfds():
        Prepared(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return written


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    return root, {name: write_prepared(name, root) for name in ("cifar10", "imdb_reviews")}


def test_prepared_images_load_exactly_as_written(prepared_dir):
    root, written = prepared_dir
    written = written["cifar10"]
    source = DATASETS.get("cifar10")
    assert source.where(str(root)).startswith(str(root))
    assert source.availability(str(root)) == "prepared"
    data = source.load(str(root))
    assert data.x_train.dtype == np.uint8 and data.x_train.shape == (12, 32, 32, 3)
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        # TFDS stores the examples in a shuffled order: compare (image, label) pairs as sets
        assert sorted((img.tobytes(), int(label)) for img, label in zip(x, y)) == sorted(
            (e["_pixels"].tobytes(), e["label"]) for e in written[split])
    pixels = data.x_train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(data.mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(data.std, pixels.std(0), rtol=1e-6)


def test_prepared_text_loads_as_byte_tokens(prepared_dir):
    root, written = prepared_dir
    written = written["imdb_reviews"]
    data = DATASETS.get("imdb_reviews(seq_len=24)").load(str(root))
    assert data.x_train.shape == (12, 24) and data.x_train.dtype == np.int32
    labels = {e["text"].encode("utf-8")[:24]: e["label"] for e in written["train"]}
    for row, label in zip(data.x_train, data.y_train):
        text = bytes((row[row > 0] - 1).astype(np.uint8))
        assert labels[text] == label  # stored shuffled: find the example by its text
        assert (row[len(text):] == 0).all()
    assert len({r.tobytes() for r in data.x_train}) == len(labels) == 12


def test_tokenizer_bytes_truncation_and_padding():
    np.testing.assert_array_equal(stabench_tfds.tokenize_bytes("ab\u00e9", 6),
                                  [98, 99, 0xC3 + 1, 0xA9 + 1, 0, 0])
    np.testing.assert_array_equal(stabench_tfds.tokenize_bytes("abcdef", 3), [98, 99, 100])
    assert stabench_tfds.tokenize_bytes("", 4).tolist() == [0, 0, 0, 0]


def test_data_dir_flag_then_environment_then_default(prepared_dir, monkeypatch, tmp_path):
    root, _ = prepared_dir
    source = DATASETS.get("cifar10")
    monkeypatch.setenv("TFDS_DATA_DIR", str(root))
    assert source.available(None)  # $TFDS_DATA_DIR
    assert not source.available(str(tmp_path))  # --data-dir wins over the environment
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert stabench_tfds.resolve_data_dir(None) == (str(tmp_path / "tensorflow_datasets"),
                                                    "the TFDS default")


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_absent_data_says_what_where_how_and_fake_data(name, tmp_path, monkeypatch):
    empty, scratch = tmp_path / "empty", tmp_path / "tmp"
    empty.mkdir()
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    source = DATASETS.get(name)
    assert source.availability(str(empty)) == "missing"
    with pytest.raises(DataMissing) as err:
        source.load(str(empty))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"dataset {name} is not prepared" in msg and str(empty / name) in msg
    assert "(--data-dir)" in msg and "look elsewhere" not in msg  # it was told where to look
    assert 'pip install -e ".[prepare]"' in msg
    assert f"python -m stabench data {name} --prepare --data-dir {empty}" in msg
    assert "--fake-data" in msg
    assert list(empty.iterdir()) == []  # nothing written
    assert list(scratch.iterdir()) == []  # nor left in the temporary directory (by TFDS)


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_mock_data_loads_with_the_declared_shapes(name):
    import tensorflow_datasets as tfds

    source = DATASETS.get(name)
    with tfds.testing.mock_data(num_examples=6):
        data = source.load(None)
    meta = source.meta
    assert data.x_train.shape == (6, *meta.x_shape) and data.x_train.dtype == np.dtype(meta.x_dtype)
    assert data.y_train.dtype == np.int32 and data.y_train.max() < meta.num_outputs
    assert (data.mean is not None) == (meta.x_dtype == "uint8")


def test_tfrecord_preparation_is_reported_not_read(tmp_path):
    """A dataset prepared in TFDS's default tfrecord format cannot be read without TensorFlow."""
    root = tmp_path / "tfrec"
    write_prepared("mnist", root, n_train=3, n_test=2)
    info = next(root.glob("mnist/*/dataset_info.json"))
    doc = json.loads(info.read_text())
    doc["fileFormat"] = "tfrecord"
    info.write_text(json.dumps(doc))
    path, found = stabench_tfds.status("mnist", str(root))
    assert path is None and "tfrecord format" in found and "array_record" in found


# ---- the command line -------------------------------------------------------------------------
def test_run_without_data_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("run", "--task", "cifar", "--method", "clip_norm", "--out", out,
                   "--data-dir", empty)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "dataset cifar10 is not prepared" in lines[0] and str(empty) in lines[0]
    assert "--prepare" in lines[0] and "--fake-data" in lines[0]
    assert not out.exists() and list(empty.iterdir()) == []


def test_sweep_without_data_exits_2_before_training_any_cell(tmp_path):
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("sweep", "--task", "digits", "cifar", "--steps", "10", "--workers", "1",
                   "--out", out, "--data-dir", empty)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset cifar10 is not prepared" in lines[0], proc.stderr
    assert not out.exists()  # digits, listed first, did not train either


def test_run_with_fake_data_works_offline(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("run", "--task", "cifar", "--method", "clip_norm", "--fake-data",
                   "--steps", "50", "--seeds", "1", "--lrs", "0.01,0.05", "--batch-size", "8",
                   "--set", "model.depth=8", "--set", "model.width=4", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "record written to" in proc.stdout
    record = json.loads(next(out.rglob("*.json")).read_text())
    assert record["spec"]["fake_data"] is True and record["timing"]["steps_done"] == 50


def test_data_command_reports_presence_and_how_to_prepare(prepared_dir, tmp_path):
    root, _ = prepared_dir
    here = run_cli("data", "cifar", "--data-dir", root)
    assert here.returncode == 0 and "prepared in" in here.stdout and str(root) in here.stdout
    absent = run_cli("data", "cifar10", "--data-dir", tmp_path)
    assert absent.returncode == 1
    assert 'pip install -e ".[prepare]"' in absent.stdout
    assert f"python -m stabench data cifar10 --prepare --data-dir {tmp_path}" in absent.stdout
    assert "--file_format=array_record" in absent.stdout and "--fake-data" in absent.stdout
    generated = run_cli("data", "adding")
    assert generated.returncode == 0 and "nothing to prepare" in generated.stdout
    listed = run_cli("list", "tasks", "--data-dir", root)
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines() if line.strip()}
    assert rows["cifar10"] == "prepared" and rows["deep_plain_cifar"] == "prepared"
    assert rows["cifar100"] == "missing"


def test_prepare_without_tensorflow_says_how_to_install(tmp_path):
    try:
        import tensorflow  # noqa: F401
        pytest.skip("TensorFlow is installed here: preparing would download")
    except ImportError:
        pass
    proc = run_cli("data", "mnist", "--prepare", "--data-dir", tmp_path)
    assert proc.returncode == 2
    assert 'needs TensorFlow' in proc.stderr and 'pip install -e ".[prepare]"' in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_dataset_name_lists_choices():
    proc = run_cli("data", "cifar11")
    assert proc.returncode == 2 and "Did you mean" in proc.stderr and "cifar10" in proc.stderr
