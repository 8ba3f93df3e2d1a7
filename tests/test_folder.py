"""Training on a folder of unlabeled images (--dataset folder; fastclr/app/folder.py, imagefiles.py)
on a folder the test builds as a photo collection comes: nested sub-folders, every format and
mode PIL reads, odd sizes, and bad files -- a truncated JPEG, an empty file, a text file named
.jpg, a PNG whose header claims 100000 x 100000 pixels."""
import io
import os
import re
import shutil
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.app import folder, imagefiles, train
from test_train import _signal_at

BAD = ["broken/deep/notes.jpg", "broken/empty.png", "broken/liar.png", "broken/truncated.jpg"]
FORMATS = [("RGB", ".jpg", "JPEG"), ("L", ".png", "PNG"), ("P", ".gif", "GIF"), ("RGBA", ".png", "PNG"),
           ("CMYK", ".jpg", "JPEG"), ("I;16", ".tif", "TIFF"), ("RGB", ".webp", "WEBP"),
           ("RGB", ".bmp", "BMP"), ("LA", ".png", "PNG")]
SIZES = [(17, 90), (3000, 20), (64, 48), (40, 40), (50, 37)]


def _png_claiming(width, height) -> bytes:
    """A PNG whose IHDR (with a valid CRC) claims width x height, holding 8 x 8 pixels of data."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    return bytes(raw)


def make_folder(root, n=40, seed=0) -> list:
    """``n`` good images in nested folders (every format and mode, odd sizes) and the bad files;
    returns the good ones' relative paths."""
    rng = np.random.default_rng(seed)
    good = []
    for i in range(n):
        mode, ext, fmt = FORMATS[i % len(FORMATS)]
        w, h = SIZES[i % len(SIZES)]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
        elif mode != "RGB":
            img = img.convert(mode)
        rel = os.path.join(f"trip{i % 3}", f"day{i % 2}", f"img{i:03d}{ext}")
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        img.save(os.path.join(root, rel), fmt)
        good.append(rel)
    os.makedirs(os.path.join(root, "broken", "deep"))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (open(os.path.join(root, "broken", "truncated.jpg"), "wb")).write(buf.getvalue()[:len(buf.getvalue()) // 2])
    open(os.path.join(root, "broken", "empty.png"), "wb").close()
    with open(os.path.join(root, "broken", "deep", "notes.jpg"), "w") as f:
        f.write("not an image\n")
    with open(os.path.join(root, "broken", "liar.png"), "wb") as f:
        f.write(_png_claiming(100000, 100000))
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("not listed: no image extension\n")
    return sorted(good)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("photos"))
    return root, make_folder(root)


# --- reading --------------------------------------------------------------------------------

def test_every_image_at_any_depth_is_listed(photos):
    root, good = photos
    assert imagefiles.scan(root) == sorted(good + BAD)


def test_every_format_and_mode_decodes_to_rgb(photos):
    root, good = photos
    for rel in good:
        i = int(os.path.basename(rel)[3:6])
        img = imagefiles.decode(os.path.join(root, rel))
        assert img.mode == "RGB" and img.size == SIZES[i % len(SIZES)], rel


def test_grey_16_bit_and_alpha_convert_as_documented(tmp_path):
    grey16 = tmp_path / "g.tif"
    Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16)).save(grey16)
    assert np.asarray(imagefiles.decode(str(grey16)))[0, :, 0].tolist() == [0, 255, 128]
    clear = tmp_path / "a.png"
    Image.new("RGBA", (2, 1), (0, 0, 0, 0)).save(clear)  # fully transparent black: white
    assert np.asarray(imagefiles.decode(str(clear))).tolist() == [[[255, 255, 255]] * 2]


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to view
    Image.new("RGB", (40, 20), (200, 0, 0)).save(path, exif=exif)
    assert imagefiles.decode(str(path)).size == (20, 40)


def test_bad_files_are_named_with_the_reason(photos):
    root, _ = photos
    reasons = {}
    for rel in BAD:
        with pytest.raises(imagefiles.BadImage) as exc:
            imagefiles.decode(os.path.join(root, rel))
        reasons[rel] = str(exc.value)
    assert "truncated" in reasons["broken/truncated.jpg"]
    assert "DecompressionBomb" in reasons["broken/liar.png"]


@pytest.mark.parametrize("width,height", [(17, 90), (3000, 20), (500, 375), (1, 1)])
def test_crop_box_lies_inside_and_keeps_the_ratio_range(width, height):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for seed in range(200):
        left, top, w, h = imagefiles.crop_box(np.random.default_rng(seed), width, height, scale, ratio)
        assert 0 <= left and 0 <= top and 1 <= w and 1 <= h
        assert left + w <= width and top + h <= height
        inside = ratio[0] - 0.05 <= w / h <= ratio[1] + 0.05  # rounding to whole pixels
        fallback = (left, top) == ((width - w) // 2, (height - h) // 2)
        assert inside or fallback or min(w, h) < 10, (seed, left, top, w, h)


def test_crops_come_from_the_original_then_are_resized():
    img = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)), "RGB")
    out = imagefiles.resized_crop(img, (50, 10, 100, 80), 16)
    assert out.shape == (16, 16, 3)
    assert 50 <= out[..., 0].min() and out[..., 0].max() <= 150  # only the box's columns


# --- batches --------------------------------------------------------------------------------

def _batches(root, workers=0, bad=None, world=1, rank=0):
    ds = folder.load(root, (0.5,) * 3, (0.25,) * 3)
    if bad is not None:
        ds.bad = dict(bad)
    return ds, folder.FileBatches(ds, 8, 12, seed=3, workers=workers, rank=rank, world_size=world,
                                  scale=(0.2, 1.0), max_bad=0.5)


def test_draws_do_not_depend_on_workers_ranks_or_what_was_known(photos):
    root, _ = photos
    ds, one = _batches(root, workers=0)
    first = [x for x, _ in one.epoch(1)]
    bad = dict(ds.bad)
    assert bad and {ds.files[i] for i in bad} <= set(BAD)
    _, two = _batches(root, workers=2)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, two.epoch(1)))
    _, known = _batches(root, bad=bad)  # resumed: the bad files known, never decoded again
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, known.epoch(1)))
    halves = [_batches(root, world=2, rank=r)[1] for r in range(2)]
    for a, (b0, _), (b1, _) in zip(first, halves[0].epoch(1), halves[1].epoch(1)):
        assert torch.equal(a, torch.cat([b0, b1], dim=1))  # two ranks: the same global batch
    assert all(x.shape == (2, 12, 3, 8, 8) for x in first)  # every step keeps its size


def test_a_folder_of_only_bad_files_is_one_clear_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(30):
        (root / f"x{i}.jpg").write_text("no")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"files cannot be decoded, and none .* could .*bad_files.txt"):
        train.main(["--dataset", "folder", "--data-dir", str(root), "--out", str(out), "--epochs", "1",
                    "--batch-size", "8", "--image-size", "8", "--width", "2", "--workers", "0",
                    "--no-progress"])
    assert len(open(out / "bad_files.txt").read().splitlines()) >= 8
    assert not os.path.exists(out / "checkpoint.pt")


def test_more_bad_files_than_allowed_stop_the_run(photos, tmp_path, capsys):
    """Judged at the loop's look at the device (every --log-every steps), on the counts of every
    rank; the run is checkpointed where it stopped."""
    root = str(tmp_path / "photos")
    shutil.copytree(photos[0], root)
    for i in range(10):
        with open(os.path.join(root, "broken", f"more{i}.png"), "w") as f:
            f.write("no")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.main(TINY[:-2] + ["--data-dir", root, "--out", str(out), "--epochs", "3", "--log-every", "1"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"stopping (in|after) epoch .*: .* \d+ of the \d+ files read so far cannot be decoded, "
                     r"more than --max-bad-files 0.05 of them .*bad_files.txt; checkpoint", err), err[-2000:]
    assert os.path.exists(out / "checkpoint.pt")


# --- a run ----------------------------------------------------------------------------------

TINY = ["--dataset", "folder", "--epochs", "2", "--batch-size", "12", "--image-size", "8", "--width", "2",
        "--workers", "2", "--no-progress", "--proj-dim", "8", "--deterministic", "--max-bad-files", "0.2"]


def test_a_run_trains_resumes_exactly_and_lists_its_files(photos, tmp_path, monkeypatch):
    root, good = photos
    a = train.main(TINY + ["--data-dir", root, "--out", str(tmp_path / "a")])
    assert a["steps"] == 2 * (44 // 12) and "alignment" in a and "uniformity" in a
    listed = open(tmp_path / "a" / "bad_files.txt").read().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == BAD
    assert open(tmp_path / "a" / "files.txt").read().split() == sorted(good + BAD)
    _signal_at(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(TINY + ["--data-dir", root, "--out", str(tmp_path / "b"), "--log-every", "1"])
    monkeypatch.undo()
    b = train.main(TINY + ["--data-dir", root, "--out", str(tmp_path / "b"), "--resume", "auto"])
    assert b["final_loss"] == a["final_loss"] and b["alignment"] == a["alignment"]


def test_a_changed_folder_stops_a_resume_unless_rescan(photos, tmp_path, capsys):
    root = str(tmp_path / "photos")
    shutil.copytree(photos[0], root)
    out = str(tmp_path / "run")
    train.main(TINY + ["--data-dir", root, "--out", out, "--epochs", "1"])
    os.remove(os.path.join(root, "trip0", "day0", "img000.jpg"))
    with pytest.raises(SystemExit, match=r"changed \(0 added, 1 removed.*--rescan"):
        train.main(TINY + ["--data-dir", root, "--out", out, "--epochs", "1", "--resume", "auto"])
    train.main(TINY + ["--data-dir", root, "--out", out, "--epochs", "1", "--resume", "auto", "--rescan"])


# --- python -m fastclr.embed ------------------------------------------------------------------

def test_embed_writes_every_good_image_and_names_the_bad(photos, tmp_path):
    from fastclr.app import embed
    root = str(tmp_path / "photos")
    shutil.copytree(photos[0], root)
    shutil.copy(os.path.join(root, "trip0", "day0", "img000.jpg"), os.path.join(root, "copy_of_img000.jpg"))
    run = str(tmp_path / "run")
    train.main(TINY + ["--data-dir", root, "--out", run, "--epochs", "1"])
    out = str(tmp_path / "emb.npz")
    got = embed.main([run, root, "--out", out, "--fp16", "--duplicates", "0.999", "--neighbours", "2",
                      "--queries", "3", "--no-progress", "--workers", "0"])
    saved = np.load(out, allow_pickle=False)
    assert list(saved["paths"]) == sorted(photos[1] + ["copy_of_img000.jpg"])
    assert list(saved["bad_paths"]) == BAD and len(saved["bad_reasons"]) == 4
    assert saved["features"].dtype == np.float16 and saved["features"].shape == (len(saved["paths"]), 16)
    assert saved["embeddings"].shape == (len(saved["paths"]), 8)
    np.testing.assert_allclose(saved["features"], got["features"], rtol=1e-2, atol=1e-2)
    with open(str(tmp_path / "emb_duplicates.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "path,path,similarity"
    assert "copy_of_img000.jpg,trip0/day0/img000.jpg" in [r.rsplit(",", 1)[0] for r in rows[1:]]
    assert Image.open(str(tmp_path / "emb_neighbours.png")).size == (3 * 100 + 4, 3 * 100 + 4)


def test_bench_folder_runs(capsys):
    from benchmarks import bench_folder
    bench_folder.main(["--images", "12", "--sizes", "16", "--batch", "4", "--workers", "0", "--repeats", "1",
                       "--no-save"])
    assert "crop the original in the workers" in capsys.readouterr().out


# --- --val-dir: a labelled folder to evaluate on -----------------------------------------------

def _labelled(root, per_class=9):
    rng = np.random.default_rng(1)
    for name, level in (("dark", 30), ("light", 220)):
        os.makedirs(os.path.join(root, name, "nested"))
        for i in range(per_class):
            arr = np.clip(rng.normal(level, 10, (20 + i, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(root, name, "nested" if i % 2 else "", f"{i}.png"))
    with open(os.path.join(root, "light", "broken.jpg"), "w") as f:
        f.write("no")


def test_val_dir_is_split_per_class_by_a_seeded_order(tmp_path):
    from fastclr.app import data
    _labelled(str(tmp_path))
    a = data.labelled_folder(str(tmp_path), 8, (0.5,) * 3, (0.25,) * 3, seed=4, workers=0)
    b = data.labelled_folder(str(tmp_path), 8, (0.5,) * 3, (0.25,) * 3, seed=4, workers=0)
    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.test_labels, b.test_labels)
    assert np.bincount(a.train_labels).tolist() == [5, 5] and np.bincount(a.test_labels).tolist() == [4, 4]
    assert a.train_images.shape[1:] == (8, 8, 3) and list(a.skipped) == ["light/broken.jpg"]
    c = data.labelled_folder(str(tmp_path), 8, (0.5,) * 3, (0.25,) * 3, seed=5, workers=0)
    assert not np.array_equal(a.train_images, c.train_images)  # another seed, another split


def test_a_folder_run_evaluates_on_its_val_dir(photos, tmp_path):
    import json
    _labelled(str(tmp_path / "val"))
    out = tmp_path / "run"
    result = train.main(TINY + ["--data-dir", photos[0], "--out", str(out), "--epochs", "1",
                                "--val-dir", str(tmp_path / "val"), "--knn-k", "3"])
    assert 0 <= result["knn_top1"] <= 1 and 0 <= result["linear_top1"] <= 1
    report = json.load(open(out / "eval.json"))
    assert "each class's images in a seeded order" in report["split"]
    assert list(report["skipped_files"]) == ["light/broken.jpg"]


def test_two_ranks_read_a_folder_and_list_every_rank_s_bad_files(photos, tmp_path):
    """torchrun, 2 gloo processes: each rank reads its part of every global batch; the bad files
    either met are gathered into the checkpoint and bad_files.txt."""
    import subprocess
    import sys
    from test_train import REPO
    out = tmp_path / "ddp"
    args = [a if a != "2" or i == 0 or TINY[i - 1] != "--workers" else "0" for i, a in enumerate(TINY)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "fastclr.train", *args, "--data-dir", photos[0], "--out", str(out), "--seed", "4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # which bad files each rank meets in the run's two epochs, and the evaluation's held-out ones
    met = {}
    for rank in range(2):
        ds = folder.load(photos[0], (0.5,) * 3, (0.25,) * 3)
        batches = folder.FileBatches(ds, 8, 12, seed=4, rank=rank, world_size=2, workers=0, scale=(0.2, 1.0))
        for epoch in range(2):
            list(batches.epoch(epoch))
        met[rank] = {ds.files[i] for i in ds.bad}
    held = {ds.files[i] for i in ds.held_out} & set(BAD)
    assert met[1] - met[0] - held, "the test needs a bad file only rank 1 meets"
    expected = sorted(met[0] | met[1] | held)
    listed = open(out / "bad_files.txt").read().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == expected
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert sorted(state["data"]["bad_files"]) == expected


def test_a_labelled_imagefolder_reads_files_the_same_way(photos, tmp_path, capsys):
    """--dataset imagefolder trains through the same FileBatches (the crop of the original, bad
    files skipped and listed) with its labels; its evaluation skips a bad file too."""
    root, good = photos
    for split in ("train", "val"):
        for k, rel in enumerate(good):
            dest = tmp_path / "data" / split / f"c{k % 2}" / rel.replace(os.sep, "_")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(root, rel), dest)
    (tmp_path / "data" / "train" / "c0" / "broken.jpg").write_text("no")
    (tmp_path / "data" / "val" / "c1" / "broken.png").write_text("no")
    out = tmp_path / "run"
    result = train.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                         "--epochs", "2", "--batch-size", "12", "--image-size", "8", "--width", "2",
                         "--workers", "0", "--no-progress", "--knn-k", "5", "--probe-epochs", "2"])
    assert 0 <= result["knn_top1"] <= 1
    assert [line.split("\t")[0] for line in open(out / "bad_files.txt").read().splitlines()] == ["c0/broken.jpg"]
    assert "evaluation: skipped" in capsys.readouterr().err
    batches = folder.FileBatches(data_files(tmp_path / "data"), 8, 12, workers=0)
    _, labels = next(batches.epoch(0))
    assert set(labels.tolist()) <= {0, 1} and len(labels) == 12


def data_files(root):
    from fastclr.app import data
    return data.labelled_files(data.load_dataset("imagefolder", str(root)))
