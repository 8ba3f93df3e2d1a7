"""The training loop end to end: tiny runs on the digits, resume equivalence, SIGTERM, bad
checkpoints, non-finite losses, the final JSON line, configs, no host synchronisation per step,
and torchrun with 2 gloo processes (a rank killed and restarted included)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastclr.app import train

# A tiny but real run: ResNet-18 at width 4 on 8 px digits, 3 steps per epoch.
TINY = ["--epochs", "2", "--batch-size", "400", "--width", "4", "--image-size", "8",
        "--probe-epochs", "5", "--no-progress", "--knn-k", "20", "--deterministic"]  # exact resume on any CPU
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # timings differ from run to run
        for k in ("images_per_sec", "elapsed_s"):
            r.pop(k)
    return rows


def test_tiny_run_outputs(tmp_path, capsys):
    out = str(tmp_path / "run")
    res = train.main(TINY + ["--out", out, "--eval-random-init", "--eval-every", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == res
    for key in ("knn_top1", "linear_top1", "images_per_sec", "epochs", "steps", "checkpoint"):
        assert key in res
    assert res["epochs"] == 2 and res["steps"] == 2 * (1437 // 400)
    assert 0 <= res["knn_top1"] <= 1 and 0 <= res["linear_top1"] <= 1 and res["images_per_sec"] > 0
    assert set(res["random_init"]) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}
    assert res["knn_top5"] >= res["knn_top1"] and res["linear_top5"] >= res["linear_top1"]
    rows = _metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(r["knn_top1"] for r in rows)  # --eval-every 1, and the final one
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(out, "tensorboard")))
    state = torch.load(res["checkpoint"], weights_only=True)["run"]
    assert state["epoch"] == 2 and state["batch"] == 0 and state["step"] == res["steps"]
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    import yaml
    with open(os.path.join(out, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["width"] == 4 and saved["epochs"] == 2 and "resume" not in saved


def _signal_at(monkeypatch, at_step, signum=signal.SIGTERM):
    """Deliver a real signal to this process while step `at_step` is being computed."""
    real = train.TorchViews.__call__

    def call(self, x, step):
        if step == at_step:
            os.kill(os.getpid(), signum)
        return real(self, x, step)
    monkeypatch.setattr(train.TorchViews, "__call__", call)


def _ckpt(path):
    return torch.load(path, weights_only=True)["run"]


@pytest.mark.parametrize("log_every, stopped_at, message", [
    ("1", (1, 2, 5), "in epoch 2 of 3, after batch 2 of 3 (step 5)"),  # mid-epoch
    ("10", (2, 0, 6), "after epoch 2 of 3 (step 6)"),  # read at the end of the epoch
])
def test_resume_after_signal_equals_uninterrupted(tmp_path, monkeypatch, capsys, log_every,
                                                   stopped_at, message):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = TINY + ["--epochs", "3", "--log-every", log_every]
    full = train.main(args + ["--out", a])
    _signal_at(monkeypatch, 4)  # while step 5 (epoch 2 of 3 steps each) is computed
    with pytest.raises(SystemExit) as exc:
        train.main(args + ["--out", b])
    assert exc.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM {message}" in err and "--resume" in err
    state = _ckpt(os.path.join(b, "checkpoint.pt"))
    assert (state["epoch"], state["batch"], state["step"]) == stopped_at
    monkeypatch.undo()
    resumed = train.main(args + ["--out", b, "--resume", "auto"])
    assert f"resumed {message}" in capsys.readouterr().out  # one numbering in both messages
    for k in ("knn_top1", "linear_top1", "final_loss", "steps"):
        assert resumed[k] == full[k], k
    assert _metrics(a) == _metrics(b)


def test_sigint_also_checkpoints(tmp_path, monkeypatch):
    _signal_at(monkeypatch, 1, signal.SIGINT)
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out", str(tmp_path), "--log-every", "1"])
    assert exc.value.code == 128 + signal.SIGINT
    assert _ckpt(tmp_path / "checkpoint.pt")["step"] == 2


def test_sigterm_subprocess(tmp_path):
    """A real SIGTERM from outside while training: checkpoint written, clear message, 143."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastclr.train", *TINY, "--epochs", "200", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = out / "checkpoint.pt"
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpt.exists(), proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    state = _ckpt(ckpt)
    assert 0 < state["step"] < 200 * 3


def test_bad_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "1", "--out", out])
    ckpt = os.path.join(out, "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"different run: --width 4 there, 8 here"):
        train.main(TINY + ["--width", "8", "--out", out, "--resume", ckpt])
    bad = tmp_path / "corrupt.pt"
    with open(ckpt, "rb") as f:
        bad.write_bytes(f.read()[:5000])
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*corrupt\.pt"):
        train.main(TINY + ["--out", out, "--resume", str(bad)])
    # Seeded noise (os.urandom began with the pickle magic 0x80 one run in 256: a flaky test).
    noise_bytes = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"\x00" + noise_bytes[1:])
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out", out, "--resume", str(noise)])
    assert "noise.pt is not a checkpoint" in str(exc.value) and "weights_only" not in str(exc.value)
    like_pickle = tmp_path / "like_pickle.pt"  # noise that starts as a pickle does: read, then refused
    like_pickle.write_bytes(b"\x80" + noise_bytes[1:])
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*like_pickle\.pt \(truncated or corrupt"):
        train.main(TINY + ["--out", out, "--resume", str(like_pickle)])
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": argparse_namespace()}, pickled)
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out", out, "--resume", str(pickled)])
    assert "not a fastclr checkpoint" in str(exc.value) and "weights_only" not in str(exc.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(SystemExit, match=r"other\.pt is not a fastclr training checkpoint"):
        train.main(TINY + ["--out", out, "--resume", str(other)])
    with pytest.raises(SystemExit, match=r"no checkpoint at .*missing\.pt"):
        train.main(TINY + ["--out", out, "--resume", str(tmp_path / "missing.pt")])


def argparse_namespace():
    import argparse
    return argparse.Namespace(a=1)  # not loadable with weights_only=True


def _nan_at(monkeypatch, steps):
    real = train.nt_xent_fused
    calls = {"n": 0}

    def fake(*a, **k):
        loss, acc = real(*a, **k)
        calls["n"] += 1
        if calls["n"] - 1 in steps:
            loss = loss * float("nan")
        return loss, acc
    monkeypatch.setattr(train, "nt_xent_fused", fake)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {1})
    res = train.main(TINY + ["--out", str(tmp_path)])
    assert res["bad_steps"] == 1 and res["steps"] == 6
    assert all(map(lambda v: v == v, [res["final_loss"], res["knn_top1"]]))  # not NaN


def test_too_many_nonfinite_losses_stop_the_run(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, set(range(2, 100)))
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out", str(tmp_path), "--max-bad-steps", "3", "--log-every", "1"])
    assert exc.value.code == 3
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err
    state = _ckpt(tmp_path / "checkpoint.pt")
    assert state["step"] == 5 and state["bad_steps"] == 3


@pytest.mark.parametrize("optimizer", ["lars", "sgd", "adamw"])
def test_nonfinite_steps_change_nothing(tmp_path, monkeypatch, optimizer):
    """Skipped steps leave the weights and the optimizer's state (LARS's or SGD's momentum,
    AdamW's moments and step count) exactly as they were (the flag is read on the device), and
    the stop is seen at the next read (default --log-every 10: here the end of epoch 2)."""
    args = TINY + ["--epochs", "3", "--max-bad-steps", "2", "--optimizer", optimizer]
    _nan_at(monkeypatch, {3, 4, 5})  # every step of epoch 2
    with pytest.raises(SystemExit) as exc:
        train.main(args + ["--out", str(tmp_path / "a")])
    assert exc.value.code == 3
    bad = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert (bad["run"]["step"], bad["run"]["bad_steps"], bad["run"]["epoch"]) == (6, 3, 2)
    monkeypatch.undo()
    _signal_at(monkeypatch, 1)  # seen at the end of epoch 1: a checkpoint after 3 good steps
    with pytest.raises(SystemExit):
        train.main(args + ["--out", str(tmp_path / "b")])
    good = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert good["run"]["step"] == 3
    for k, v in good["model"].items():
        if not k.endswith("num_batches_tracked"):  # BN's counters count the forwards
            assert torch.equal(v, bad["model"][k]) or "running" in k, k
    for i, s in good["optimizer"]["state"].items():
        assert s.keys() == bad["optimizer"]["state"][i].keys()
        for name, value in s.items():
            assert torch.equal(value, bad["optimizer"]["state"][i][name]), name


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--crop-scale", "1.5"], "--crop-scale must be in"),
    (["--dataset", "cifar10"], "needs --data-dir"),
    (["--batch-size", "5000"], "larger than the training set"),
])
def test_bad_arguments(tmp_path, argv, message, capsys):
    with pytest.raises((SystemExit, ValueError)) as exc:
        train.main(["--out", str(tmp_path), *argv])
    text = str(exc.value) + capsys.readouterr().err
    assert message in text


def test_torchrun_two_gloo_processes(tmp_path):
    """The advertised multi-process path runs end to end: torchrun, DDP over gloo, sharded data,
    the gathered loss; one JSON line from rank 0."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "fastclr.train", *TINY, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too: nothing left behind
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["world_size"] == 2 and res["steps"] == 6


def test_imagefolder_run(tmp_path):
    from PIL import Image
    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in ("cat", "dog"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 256, (20, 24, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(img).save(d / f"{i}.png")
    res = train.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                      "--batch-size", "8", "--image-size", "16", "--width", "4", "--workers", "0",
                      "--probe-epochs", "2", "--no-progress", "--out", str(tmp_path / "out")])
    assert res["steps"] == 24 // 8 and 0 <= res["linear_top1"] <= 1


def test_dali_cpu_augmentation_run(tmp_path):
    pytest.importorskip("nvidia.dali")
    res = train.main(TINY + ["--augment", "dali", "--epochs", "1", "--out", str(tmp_path)])
    assert res["steps"] == 3 and res["final_loss"] == res["final_loss"]


# --- a file system that refuses a write -------------------------------------------------------

def _fail_fsync_of(monkeypatch, name, from_call, errno_=28):
    """os.fsync raises OSError(errno_) (28: ENOSPC) for files named like ``name`` from their
    ``from_call``-th write on: the temporary file then exists, partly written, when it fails."""
    import errno
    real, calls = os.fsync, {"n": 0}

    def fsync(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if name in os.path.basename(target) and ".tmp" in target:
            calls["n"] += 1
            if calls["n"] >= from_call:
                raise OSError(errno_, os.strerror(errno_))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return errno


def test_a_full_disk_while_checkpointing_is_one_message_and_loses_nothing(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    _fail_fsync_of(monkeypatch, "checkpoint.pt", 2)  # epoch 1's checkpoint is written, epoch 2's is not
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out", out])
    message = str(exc.value)
    assert exc.value.code not in (0, None) and message.startswith("fastclr.train: could not write the checkpoint")
    for part in ("No space left on device", "MiB needed", "The last good checkpoint is",
                 "after epoch 1 of 2 (step 3)", "--resume auto continues from it"):
        assert part in message, (part, message)
    assert not [n for n in os.listdir(out) if ".tmp" in n or n.startswith(".fastclr")]
    assert _ckpt(os.path.join(out, "checkpoint.pt"))["step"] == 3  # the last good one, intact
    monkeypatch.undo()
    resumed = train.main(TINY + ["--out", out, "--resume", "auto"])
    whole = train.main(TINY + ["--out", str(tmp_path / "whole")])
    assert (resumed["final_loss"], resumed["knn_top1"]) == (whole["final_loss"], whole["knn_top1"])


def test_metrics_that_cannot_be_written_end_the_run_clearly(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    _fail_fsync_of(monkeypatch, "metrics.csv", 1, errno_=30)  # EROFS
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out", out])
    assert "could not write the metrics" in str(exc.value) and "Read-only file system" in str(exc.value)
    assert "No checkpoint has been written yet" in str(exc.value)  # metrics come before it
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_final_evaluation_results_that_cannot_be_written_end_the_run_clearly(tmp_path, monkeypatch):
    import errno
    from fastclr.app import evaluate as ev

    def full_disk(path, *a, **k):
        open(path, "wb").close()  # a partly written plot in the staging folder
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ev, "confusion_plot", full_disk)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--epochs", "1", "--out", out])
    message = str(exc.value)
    assert message.startswith("fastclr.train: could not write the evaluation results"), message
    assert "No space left on device" in message and "after epoch 1 of 1 (step 3)" in message
    assert not [n for n in os.listdir(out) if n.startswith((".eval", "eval"))]  # nothing partial left
    assert _ckpt(os.path.join(out, "checkpoint.pt"))["step"] == 3


def test_a_read_error_during_the_final_evaluation_is_not_called_a_write_failure(tmp_path, monkeypatch):
    import errno
    from fastclr.app import eval_run

    def unreadable(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/data/val/3/img.png")
    monkeypatch.setattr(eval_run, "split_features", unreadable)
    with pytest.raises(OSError, match=r"Input/output error.*img\.png"):
        train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])


def test_an_output_folder_that_cannot_be_written_is_refused_first(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="cannot write to the output folder .*a_file/run.*give another --out"):
        train.main(TINY + ["--out", str(a_file / "run")])
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
