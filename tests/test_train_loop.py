"""The training loop's promises: no host synchronisation per step, the loss family (SupCon,
multi-view), gradient caching, the schedule checks on resume, step checkpoints, the final
evaluation under SIGTERM, DALI's resumed order, a rank killed under torchrun, any backbone and
optimizer, the supervised baseline, fp16 loss scaling."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastclr.app import checkpoint, config, data, runtime, train
from test_train import REPO, TINY, _signal_at

# --- no host synchronisation per step ------------------------------------------------------------

class _CountSyncs(torch.overrides.TorchFunctionMode):
    """Counts the tensor methods that make the host wait for the device."""
    SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
             "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _setup(tmp_path, *extra):
    args = config.parse_args(TINY + ["--out", str(tmp_path), *extra])
    device, rank, world = runtime.setup_distributed(args.device)
    return train.setup_run(args, device, rank, world)


@pytest.mark.parametrize("extra", [[], ["--loss", "supcon"], ["--views", "3"], ["--micro-batch", "150"],
                                   ["--precision", "fp16"], ["--optimizer", "adamw"]],
                         ids=["ntxent", "supcon", "views3", "micro-batch", "fp16", "adamw"])
def test_steady_state_step_makes_no_host_sync(tmp_path, extra):
    run = _setup(tmp_path, *extra)
    batches = run.batches.epoch(0)
    train.train_step(run, *next(batches))  # the first step may set things up
    with _CountSyncs() as mode:
        for x, labels in batches:
            train.train_step(run, x, labels)
    assert mode.calls == []
    # and the loop reads the device once per --log-every steps and at the end of the epoch
    run.state = train.RunState()
    run.config.log_every = 2
    with _CountSyncs() as mode, run.stop_request:
        train.run_epoch(run)
    assert mode.calls.count("tolist") == 2 and set(mode.calls) == {"tolist"}, mode.calls


def test_the_count_sees_a_sync():
    """The detector itself works: a loop that reads the loss each step is caught."""
    with _CountSyncs() as mode:
        float(torch.ones(1).sum())
        torch.ones(2).tolist()
    assert mode.calls == ["__float__", "tolist"]


@pytest.mark.cuda
@pytest.mark.parametrize("extra", [[], ["--micro-batch", "150"], ["--precision", "fp16"]],
                         ids=["plain", "micro-batch", "fp16"])
def test_no_sync_on_gpu(tmp_path, extra):
    """On a GPU: torch's own sync detector raises at any synchronising call in the step."""
    run = _setup(tmp_path, "--device", "cuda", "--augment", "torch", *extra)
    batches = run.batches.epoch(0)
    train.train_step(run, *next(batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, labels in batches:
            train.train_step(run, x.pin_memory(), labels.pin_memory())
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- the loss family ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--loss", "supcon"], ["--loss", "supcon", "--positives", "sum"],
                                   ["--views", "4"], ["--loss", "supcon", "--views", "3"],
                                   ["--loss", "supervised"], ["--optimizer", "sgd"],
                                   ["--optimizer", "adamw"], ["--precision", "fp16"]])
def test_loss_family_runs_and_resumes_exactly(tmp_path, monkeypatch, extra):
    a = train.main(TINY + extra + ["--out", str(tmp_path / "a")])
    assert a["final_loss"] == a["final_loss"] and a["views"] == (int(extra[-1]) if "--views" in extra else 2)
    _signal_at(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(TINY + extra + ["--out", str(tmp_path / "b"), "--log-every", "1"])
    monkeypatch.undo()
    b = train.main(TINY + extra + ["--out", str(tmp_path / "b"), "--resume", "auto"])
    assert (a["final_loss"], a["knn_top1"], a["linear_top1"]) == (b["final_loss"], b["knn_top1"], b["linear_top1"])


def test_views_augment_independently():
    args = config.parse_args(TINY + ["--views", "3"])
    views = train.TorchViews(args, (0.5,) * 3, (0.2,) * 3, torch.device("cpu"), torch.float32, False, 0)
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    v = views(x, 0)
    assert len(v) == 3 and all(t.shape == (5, 3, 8, 8) for t in v)
    assert not torch.equal(v[0], v[1]) and not torch.equal(v[1], v[2])
    assert all(torch.equal(p, q) for p, q in zip(v, views(x, 0)))  # seeded by the step


# --- gradient caching ---------------------------------------------------------------------------

def test_micro_batch_forwards_micro_batches(tmp_path):
    """--micro-batch 150 of 400 images: three micro-batches (150, 150, 100 images, both views
    together), each forwarded without and then with autograd."""
    run = _setup(tmp_path, "--micro-batch", "150")
    rows = []
    run.raw_model.register_forward_hook(lambda m, i, o: rows.append((i[0].shape[0], torch.is_grad_enabled())))
    train.train_step(run, *next(run.batches.epoch(0)))
    assert rows == [(300, False), (300, False), (200, False), (300, True), (300, True), (200, True)]


def test_micro_batch_runs_and_resumes_exactly(tmp_path, monkeypatch):
    a = train.main(TINY + ["--micro-batch", "64", "--out", str(tmp_path / "a")])
    _signal_at(monkeypatch, 3)
    with pytest.raises(SystemExit):
        train.main(TINY + ["--micro-batch", "64", "--out", str(tmp_path / "b"), "--log-every", "1"])
    monkeypatch.undo()
    b = train.main(TINY + ["--micro-batch", "64", "--out", str(tmp_path / "b"), "--resume", "auto"])
    assert (a["final_loss"], a["knn_top1"], a["linear_top1"]) == (b["final_loss"], b["knn_top1"], b["linear_top1"])
    # the whole batch in one micro-batch is the plain step, bit for bit
    c = train.main(TINY + ["--micro-batch", "400", "--out", str(tmp_path / "c")])
    d = train.main(TINY + ["--out", str(tmp_path / "d")])
    assert (c["final_loss"], c["knn_top1"]) == (d["final_loss"], d["knn_top1"])
    assert a["final_loss"] != d["final_loss"]  # BatchNorm statistics per micro-batch differ


def test_bad_micro_batch_flag(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(TINY + ["--micro-batch", "0"])
    assert "--micro-batch must be >= 1, got 0" in capsys.readouterr().err


# --- resume: the schedule, finished runs, step checkpoints ----------------------------------------

def test_resume_refuses_a_changed_schedule(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    train.main(TINY + ["--out", out])
    with pytest.raises(SystemExit) as exc:  # finished: the cosine ended at 0
        train.main(TINY + ["--out", out, "--resume", "auto", "--epochs", "4"])
    msg = str(exc.value)
    assert "is a finished run" in msg and "decayed to 0" in msg and "new run" in msg
    _signal_at(monkeypatch, 1)
    with pytest.raises(SystemExit):
        train.main(TINY + ["--out", str(tmp_path / "mid"), "--epochs", "4", "--log-every", "1"])
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out", str(tmp_path / "mid"), "--resume", "auto", "--epochs", "8"])
    assert "the lr would jump from" in str(exc.value) and "--epochs 4" in str(exc.value)
    # a finished run resumed unchanged just redoes the final evaluation
    again = train.main(TINY + ["--out", out, "--resume", "auto"])
    assert again["steps"] == 6


def test_base_lr_can_change_on_resume(tmp_path, monkeypatch, capsys):
    """The stop message after non-finite losses says 'lower --base-lr ... then --resume': the
    lr is a function of the step and the flags, so the new value takes effect."""
    out = str(tmp_path / "run")
    _signal_at(monkeypatch, 1)
    with pytest.raises(SystemExit):
        train.main(TINY + ["--out", out, "--log-every", "1"])
    monkeypatch.undo()
    args = config.parse_args(TINY + ["--out", out, "--resume", "auto", "--base-lr", "0.03"])
    run = train.setup_run(args, torch.device("cpu"), 0, 1)
    assert run.lr_at(run.state.step) == pytest.approx(0.03 * 400 / 256 * config.lr_factor(2, 6, 1))


def test_checkpoint_every_steps(tmp_path, monkeypatch):
    seen = []
    real = checkpoint.checkpoint_bytes

    def spy(state):
        seen.append((state["run"]["epoch"], state["run"]["batch"], state["run"]["step"]))
        return real(state)
    monkeypatch.setattr(checkpoint, "checkpoint_bytes", spy)
    train.main(TINY + ["--out", str(tmp_path), "--ckpt-every-steps", "2", "--ckpt-every", "2"])
    assert seen == [(0, 2, 2), (1, 1, 4), (2, 0, 6)]


def test_sigterm_during_final_evaluation_says_so(tmp_path, monkeypatch, capsys):
    real = train.run_evaluation

    def evaluation(run, *, probe, **kw):
        if probe:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run, probe=probe, **kw)
    monkeypatch.setattr(train, "run_evaluation", evaluation)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out", out])
    assert exc.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM during the final evaluation" in err and "--resume" in err
    monkeypatch.undo()
    assert not [n for n in os.listdir(out) if n.startswith((".eval", "eval"))]  # nothing half-written
    res = train.main(TINY + ["--out", out, "--resume", "auto"])  # redoes the evaluation only
    assert res["steps"] == 6 and 0 <= res["linear_top1"] <= 1


# --- DALI: the same order as the torch path, resumed included -------------------------------------

def test_dali_batches_follow_batch_order_and_resume():
    pytest.importorskip("nvidia.dali")
    ds = data.load_dataset("digits")
    kw = dict(dali=dict(device="cpu", views=2), size=8)
    arrays = data.train_batches(ds, 400, seed=3)
    dali = data.train_batches(ds, 400, seed=3, **kw)
    assert len(dali) == len(arrays) == 3
    full = [lab for epoch in (0, 1) for _, lab in dali.epoch(epoch)]
    torch_order = [lab for epoch in (0, 1) for _, lab in arrays.epoch(epoch)]
    assert all(torch.equal(a, b) for a, b in zip(full, torch_order)) and len(full) == 6
    resumed = data.train_batches(ds, 400, seed=3, **kw)  # a run resumed at epoch 1, batch 1
    again = [lab for epoch, start in ((1, 1), (2, 0)) for _, lab in resumed.epoch(epoch, start)]
    assert all(torch.equal(a, b) for a, b in zip(again[:2], full[4:]))
    assert all(torch.equal(a, b) for a, b in zip(again[2:], [lab for _, lab in arrays.epoch(2)]))
    with pytest.raises(RuntimeError, match="continue at epoch 3"):
        next(resumed.epoch(5))


# --- torchrun: a rank killed mid-epoch, the group restarted ---------------------------------------

def _torchrun(out, *extra, kill_after_step=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "--max-restarts", "1", "-m", "fastclr.train", *TINY, "--epochs", "10", "--out", str(out),
           "--resume", "auto", "--ckpt-every-steps", "2", "--log-every", "1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTCLR_TEST_RUN=str(out))  # a mark the workers inherit
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        if kill_after_step is not None:
            _kill_rank_1_after(proc, str(out), kill_after_step)
        stdout, stderr = proc.communicate(timeout=600)
    except (subprocess.TimeoutExpired, AssertionError):
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun failed: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0]), stdout


def _kill_rank_1_after(proc, out, step):
    """SIGKILL the first attempt's rank-1 worker once a checkpoint at `step` or later exists."""
    ckpt = os.path.join(out, "checkpoint.pt")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(ckpt, weights_only=True)["run"]["step"] >= step:
                break
        except Exception:  # noqa: BLE001 - not written yet
            pass
        time.sleep(0.05)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if (env.get(b"RANK") == b"1" and env.get(b"TORCHELASTIC_RESTART_COUNT") == b"0"
                and env.get(b"FASTCLR_TEST_RUN") == out.encode()):
            os.kill(int(pid), signal.SIGKILL)
            return
    raise AssertionError("no rank-1 worker found to kill")


def test_torchrun_rank_killed_mid_epoch_restarts_and_matches(tmp_path):
    full, _ = _torchrun(tmp_path / "full")
    faulted, stdout = _torchrun(tmp_path / "faulted", kill_after_step=4)
    assert "resumed in epoch 2 of 10" in stdout or "resumed after epoch" in stdout, stdout[-2000:]
    for k in ("final_loss", "knn_top1", "linear_top1", "steps"):
        assert faulted[k] == full[k], k


def test_loop_functions_are_short():
    """The bar the loop was rebuilt to: every function of train.py reads at once (< 60 lines)."""
    import ast
    with open(train.__file__) as f:
        tree = ast.parse(f.read())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert max(lengths.values()) < 60, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]


def test_each_torchrun_attempt_gets_its_own_keys(monkeypatch):
    """torchrun's agent keeps one store across restarts (its keys of a killed attempt remain):
    the process group's store is prefixed by the attempt, so attempt 1 does not see attempt 0's."""
    import torch.distributed as dist
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    runtime.attempt_store(2).set("rank_0", "a dead worker's address")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not runtime.attempt_store(2).check(["rank_0"])
    assert runtime.attempt_store(2).num_keys() >= 1  # the same server: the key is there, unseen
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert runtime.attempt_store(2) is None  # not under torchrun: env:// as before


def test_any_torchvision_backbone_trains_and_resumes_exactly(tmp_path, monkeypatch):
    """A MobileNet (no --width: it is the ResNets' alone), its 3x3 stride-2 stem made stride 1."""
    tiny = [a for a in TINY if a not in ("--width", "4")] + ["--backbone", "mobilenet_v3_small"]
    args = config.parse_args(tiny)
    assert args.width is None and args.cifar_stem == "on"
    a = train.main(tiny + ["--out", str(tmp_path / "a")])
    _signal_at(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(tiny + ["--out", str(tmp_path / "b"), "--log-every", "1"])
    monkeypatch.undo()
    b = train.main(tiny + ["--out", str(tmp_path / "b"), "--resume", "auto"])
    assert (a["final_loss"], a["knn_top1"]) == (b["final_loss"], b["knn_top1"])
    with pytest.raises(SystemExit, match="different run: --optimizer 'lars' there, 'sgd' here"):
        train.main(tiny + ["--out", str(tmp_path / "b"), "--resume", "auto", "--optimizer", "sgd"])


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "mobilenet"], "'mobilenet' is not a torchvision classification model (did you mean"),
    (["--backbone", "mobilenet_v2", "--width", "8"], "--width applies to the ResNets"),
    (["--backbone", "vit_b_16", "--cifar-stem", "on"], "--cifar-stem on: vit_b_16 has no 3x3"),
    (["--backbone", "vit_b_16", "--image-size", "20"], "vit_b_16 cannot take 20 px views"),
    (["--backbone", "convnext_tiny", "--image-size", "8"], "convnext_tiny cannot take 8 px views"),
    (["--backbone", "squeezenet1_0"], "has no linear classifier"),
])
def test_backbones_a_run_cannot_use_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        train.main(["--out", str(tmp_path / "run"), "--epochs", "1", *argv])
    assert message in str(exc.value) + capsys.readouterr().err
    run = tmp_path / "run"  # refused before anything is written (the folder may have been made)
    assert not run.exists() or not os.listdir(run)


def test_adamw_defaults_to_its_own_learning_rate():
    assert config.parse_args(["--optimizer", "adamw"]).base_lr == config.ADAMW_BASE_LR
    assert config.parse_args(["--optimizer", "adamw", "--base-lr", "0.01"]).base_lr == 0.01
    assert config.parse_args(["--optimizer", "sgd"]).base_lr == config.DATASET_DEFAULTS["digits"]["base_lr"]


def test_supervised_baseline_learns_the_labels():
    """--loss supervised: cross-entropy of every view's logits against its image's label."""
    from types import SimpleNamespace
    run = SimpleNamespace(config=SimpleNamespace(loss="supervised", loss_impl="auto"),
                          device=torch.device("cpu"), group=None, rank=0)
    z, labels = torch.randn(3 * 5, 4), torch.randint(0, 4, (5,))
    loss, top1 = train.contrastive_loss(run, z, labels, 3)
    target = torch.cat([labels] * 3)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(z, target))
    assert top1.item() == (z.argmax(1) == target).float().mean().item()


def test_fp16_overflow_is_skipped_and_the_scale_recovers(tmp_path, monkeypatch):
    """--precision fp16: a step whose scaled gradients overflow changes no weight and no
    optimizer state (the found-inf flag reaches LARS on the device), halves the scale, and the
    scale grows back after growth_interval good steps."""
    run = _setup(tmp_path, "--precision", "fp16")
    assert run.amp_dtype == torch.float16
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)
    batches = run.batches.epoch(0)
    train.train_step(run, *next(batches))
    scale = run.scaler.get_scale()
    weights = {k: v.clone() for k, v in run.raw_model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    momenta = [s["momentum_buffer"].clone() for s in run.optimizer.state.values()]
    real = train.contrastive_loss
    monkeypatch.setattr(train, "contrastive_loss", lambda *a, **k: (real(*a, **k)[0] * 1e38, real(*a, **k)[1]))
    x, labels = next(batches)
    train.train_step(run, x, labels)  # 1e38 x the scale: the gradients overflow
    monkeypatch.undo()
    assert run.scaler.get_scale() == scale / 2
    state = run.raw_model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in weights.items())
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in zip(momenta, run.optimizer.state.values()))
    for _ in range(2):
        train.train_step(run, x, labels)
    assert run.scaler.get_scale() == scale  # grown back
    bad = run.sums.read(0, None)[3]
    assert bad == 1  # the overflow counted as a skipped step
