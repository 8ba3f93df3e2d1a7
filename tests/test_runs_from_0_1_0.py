"""A run folder written by fastclr 0.1.0 (tests/data/run_0.1.0: its config.yaml and the checkpoint
it saved when stopped by SIGTERM in epoch 2 of 2, after batch 2 of 3) still resumes, evaluates and
exports with this version."""
import os
import shutil

import pytest
import torch

from fastclr.app import eval_run, export, train

OLD_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "run_0.1.0")
# the command that made it (0.1.0's python -m fastclr.train, stopped at step 5) ...
FLAGS = ["--epochs", "2", "--batch-size", "400", "--width", "2", "--image-size", "8", "--probe-epochs", "5",
         "--no-progress", "--knn-k", "20", "--proj-dim", "8", "--deterministic"]
# ... and what 0.1.0 gave for that run uninterrupted, on the machine that wrote the checkpoint
# (a 2-core AMD EPYC with AVX-512); other CPUs round the rest of the run differently
FINAL_LOSS_0_1_0 = 9.538962682088217


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    return str(run)


def test_it_resumes_where_it_stopped(old_run):
    state = torch.load(os.path.join(old_run, "checkpoint.pt"), weights_only=True)["run"]
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 5)
    result = train.main(FLAGS + ["--out", old_run, "--resume", "auto"])
    assert (result["steps"], result["epochs"]) == (6, 2)
    assert result["final_loss"] == pytest.approx(FINAL_LOSS_0_1_0, rel=1e-3)
    with open(os.path.join(old_run, "metrics.csv")) as f:
        assert [line.split(",")[:2] for line in f.read().split()[1:]] == [["1", "3"], ["2", "6"]]


def test_it_evaluates_and_exports(old_run, tmp_path):
    report = eval_run.main([old_run, "--protocols", "knn,linear", "--no-progress", "--probe-epochs", "2"])
    assert report["step"] == 5 and report["dataset"] == "digits"
    out = str(tmp_path / "backbone.pt")
    export.main([old_run, "--out", out])
    net = export.load_backbone(out)
    assert net.architecture["width"] == 2 and net(torch.zeros(2, 3, 8, 8)).shape == (2, net.out_features)
