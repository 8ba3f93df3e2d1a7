"""--dataset fashion-mnist: the IDX reader (fastclr/app/idx.py) on small files the tests write,
gzipped and not, and every way such a file can be wrong; where the files are looked for; the
dataset, its validation split and its recipe. CI has no Fashion-MNIST: the check against the real
files runs only where Debian's package is installed."""
import gzip
import os
import struct

import numpy as np
import pytest

from fastclr.app import config, data, idx

NAMES = [n for pair in idx.FASHION_MNIST_FILES.values() for n in pair]


def idx_bytes(array: np.ndarray) -> bytes:
    a = np.ascontiguousarray(array, np.uint8)
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write(path, array, *, gz=False, raw: bytes | None = None):
    payload = idx_bytes(array) if raw is None else raw
    with (gzip.open if gz else open)(str(path), "wb") as f:
        f.write(payload)
    return str(path)


def fake_fashion_mnist(folder, *, n=(40, 20), gz=True, seed=0):
    """The four files with ``n`` = (train, test) random images and labels 0-9 (each class present)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for (split, (images, labels)), count in zip(idx.FASHION_MNIST_FILES.items(), n):
        x = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        y = (np.arange(count) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write(os.path.join(folder, images + suffix), x, gz=gz)
        write(os.path.join(folder, labels + suffix), y, gz=gz)
        out[split] = x, y
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_gzipped_or_not(tmp_path, gz):
    a = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    got = idx.read_idx(write(tmp_path / "a", a, gz=gz), 3)
    assert got.dtype == np.uint8 and np.array_equal(got, a)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case, message", [
    ("magic", r"is not an IDX file of 3-d unsigned bytes: its magic number is 0x00000903"),
    ("dims", r"is not an IDX file of 3-d unsigned bytes: its magic number is 0x00000801"),
    ("empty", r"is not an IDX file of 3-d unsigned bytes: its magic number is missing \(the file has 0 bytes\)"),
    ("header", r"is truncated: it ends inside its header"),
    ("truncated", r"is truncated: its header says 7 x 5 x 3 \(121 bytes with the header\), the file holds 100"),
    ("trailing", r"has trailing bytes: its header says 7 x 5 x 3"),
])
def test_bad_idx_files_are_named(tmp_path, gz, case, message):
    a = np.zeros((7, 5, 3), np.uint8)
    good = idx_bytes(a)
    raw = {"magic": b"\0\0\x09\x03" + good[4:], "dims": idx_bytes(a.reshape(-1)), "empty": b"",
           "header": good[:9], "truncated": good[:100], "trailing": good + b"\0"}[case]
    path = write(tmp_path / "f", a, gz=gz, raw=raw)
    with pytest.raises(idx.IdxError, match=message) as info:
        idx.read_idx(path, 3)
    assert path in str(info.value)


def test_damaged_gzip_is_named(tmp_path):
    whole = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(idx.IdxError, match="is a damaged gzip file .*truncated by a download"):
        idx.read_idx(str(path), 3)


@pytest.mark.parametrize("layout", ["flat", "torchvision", "plain"])
def test_dataset_from_the_files(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = fake_fashion_mnist(str(folder), gz=layout != "plain")
    ds = data.load_dataset("fashion-mnist", str(tmp_path))
    assert ds.train_images.shape == (40, 28, 28, 3) and ds.test_images.shape == (20, 28, 28, 3)
    for split, images, labels in (("train", ds.train_images, ds.train_labels),
                                  ("test", ds.test_images, ds.test_labels)):
        assert all(np.array_equal(images[..., c], arrays[split][0]) for c in range(3))
        assert labels.dtype == np.int64 and np.array_equal(labels, arrays[split][1])
    assert (ds.num_classes, ds.native_size) == (10, 28)
    assert (ds.mean, ds.std) == data.normalisation("fashion-mnist")


def test_a_missing_file_says_where_to_get_it(tmp_path):
    fake_fashion_mnist(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("fashion-mnist", str(tmp_path))
    text = str(info.value)
    assert "t10k-labels-idx1-ubyte[.gz] not found" in text and str(tmp_path) in text
    assert "apt-get install dataset-fashion-mnist" in text and "torchvision.datasets.FashionMNIST" in text


def test_without_data_dir_the_installed_places_are_searched(monkeypatch, tmp_path):
    monkeypatch.setattr(idx, "DEBIAN_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    assert idx.fashion_mnist_folders(None) == [str(tmp_path / "nowhere"), os.path.join("data", "FashionMNIST", "raw")]
    fake_fashion_mnist(os.path.join("data", "FashionMNIST", "raw"))
    assert data.load_dataset("fashion-mnist").train_images.shape[0] == 40


def test_images_and_labels_of_different_counts(tmp_path):
    fake_fashion_mnist(str(tmp_path))
    write(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8), gz=True)
    with pytest.raises(idx.IdxError, match="holds 40 images but .* 39 labels"):
        data.load_dataset("fashion-mnist", str(tmp_path))


def test_labels_outside_the_ten_classes(tmp_path):
    fake_fashion_mnist(str(tmp_path))
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, np.uint8), gz=True)
    with pytest.raises(idx.IdxError, match="has label 10; Fashion-MNIST's are 0-9"):
        data.load_dataset("fashion-mnist", str(tmp_path))


def test_validation_split_is_stratified_disjoint_and_fixed(tmp_path):
    fake_fashion_mnist(str(tmp_path), n=(200, 20))
    full = data.load_dataset("fashion-mnist", str(tmp_path))
    a = data.load_dataset("fashion-mnist", str(tmp_path), validation=50)
    b = data.load_dataset("fashion-mnist", str(tmp_path), validation=50)
    assert len(a.train_labels) == 150 and len(a.test_labels) == 50 and a.note.startswith("validation: 50")
    assert np.array_equal(a.test_images, b.test_images)
    assert np.bincount(a.test_labels).tolist() == [5] * 10  # stratified
    rows = {r.tobytes() for r in full.train_images}
    assert {r.tobytes() for r in a.test_images} <= rows and not (
        {r.tobytes() for r in a.test_images} & {r.tobytes() for r in a.train_images})
    assert not any(np.array_equal(t, v) for t in full.test_images for v in a.test_images)
    with pytest.raises(ValueError, match="--validation must be between 1 and 199"):
        data.load_dataset("fashion-mnist", str(tmp_path), validation=200)
    synthetic = data.load_dataset("synthetic", synthetic_size=300, validation=30)  # every in-memory dataset
    assert len(synthetic.test_labels) == 30 and synthetic.note.startswith("validation: 30 of the 270")
    with pytest.raises(ValueError, match="is read from disk"):
        data.load_dataset("imagefolder", str(tmp_path), validation=5)


def test_the_recipe_and_the_per_dataset_knn(tmp_path):
    assert "fashion_mnist" in config.shipped_configs()
    c = config.parse_args(["--config", "fashion_mnist", "--out", str(tmp_path)])
    assert (c.dataset, c.image_size, c.knn_k, c.cifar_stem) == ("fashion-mnist", 28, 20, "on")
    assert config.parse_args(["--dataset", "fashion-mnist"]).knn_k == 20
    assert config.parse_args([]).knn_k == 20  # digits: a class is ~144 training images
    assert config.parse_args(["--dataset", "imagefolder"]).knn_k == 200
    assert config.parse_args(["--knn-k", "7"]).knn_k == 7


@pytest.mark.skipif(not os.path.isdir(idx.DEBIAN_DIR), reason="Fashion-MNIST is not installed here")
def test_the_real_files_and_their_statistics():
    ds = data.load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 28, 28, 3) and ds.test_images.shape == (10000, 28, 28, 3)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    grey = ds.train_images[..., 0]
    assert ds.mean[0] == pytest.approx(grey.mean() / 255, abs=1e-6)
    assert ds.std[0] == pytest.approx(grey.std() / 255, abs=1e-6)


def test_the_table_script_reuses_finished_steps(tmp_path, monkeypatch):
    """benchmarks/fashion_mnist_table.py runs nothing whose output exists, and its table holds
    each evaluation's figures in the right column."""
    import json
    from benchmarks import fashion_mnist_table as fmt
    monkeypatch.setattr(fmt, "run", lambda cmd: pytest.fail(f"ran {cmd}"))
    figures = {"knn": {"top1": 0.861}, "linear": {"top1": 0.885}, "kmeans": {"nmi": 0.6, "ari": 0.45},
               "finetune": {"0.01": {"pretrained": {"top1": 0.7}, "scratch": {"top1": 0.6}},
                            "0.1": {"pretrained": {"top1": 0.8}, "scratch": {"top1": 0.75}}}}
    for run_name in ("simclr", "supervised"):
        (tmp_path / run_name).mkdir()
        (tmp_path / run_name / "eval.json").write_text("{}")
        (tmp_path / run_name / "metrics.csv").write_text("epoch,elapsed_s\n1,60\n2,1500\n")
        (tmp_path / f"eval_{run_name}").mkdir()
    for _, run_name, _, stem in fmt.ROWS:
        pixels = stem == "eval_pixels"
        results = {k: v for k, v in figures.items() if not (pixels and k == "finetune")}
        (tmp_path / f"eval_{run_name}" / f"{stem}.json").write_text(json.dumps({"results": results}))
    text = fmt.main(["--out", str(tmp_path)])
    assert "| SimCLR (the recipe) | 0.861 | 0.885 | 0.600 | 0.450 | 0.700 | 0.800 | 0.600 | 0.750 |" in text
    assert "| raw pixels | 0.861 | 0.885 | 0.600 | 0.450 | – | – | – | – |" in text
    assert "| SVC on pixels (best setting) | Xiao et al. 2017, Table 3 | 0.897 |" in text
    assert "simclr 25.0 min" in text and (tmp_path / "table.md").read_text() == text
