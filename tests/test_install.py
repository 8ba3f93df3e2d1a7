"""fastclr installed as a user installs it: a wheel (and an sdist) that hold what they must, a
fresh virtual environment that reuses this environment's torch, used from a folder outside the
repository -- a loss forward/backward and a one-epoch `python -m fastclr.train` on digits."""
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MUST = ["fastclr/__init__.py", "fastclr/triton/nt_xent.py", "fastclr/triton/similarity.py",
        "fastclr/app/train.py", "fastclr/app/configs/digits.yaml",
        "fastclr/app/configs/imagenet_resnet50_simclr.yaml", "fastclr/train.py", "fastclr/_C.json"]


def run(cmd, cwd, **kw):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from this tree (against this torch; ninja reuses build/temp)."""
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        cwd=dist)
    return next(dist.glob("fastclr-*.whl"))


@pytest.mark.slow
def test_wheel_holds_every_subpackage_the_configs_and_the_extension(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert [m for m in MUST if m not in names] == []
    assert any(n.startswith("fastclr/_C") and n.endswith(".so") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "kernels/")) for n in names)


@pytest.mark.slow
def test_sdist_holds_the_sources(tmp_path):
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(ROOT)], cwd=tmp_path)
    names = tarfile.open(next(tmp_path.glob("fastclr-*.tar.gz"))).getnames()
    for must in ("setup.py", "csrc/build.txt", "csrc/nt_xent_cpu.cpp", "kernels/nt_xent.cu",
                 "fastclr/app/configs/digits.yaml", "fastclr/triton/nt_xent.py"):
        assert any(n.endswith("/" + must) for n in names), must


@pytest.mark.slow
def test_installed_wheel_works_outside_the_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    # this environment's torch and the train extra, behind the venv's own site-packages
    (site / "reuse_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import json, torch, fastclr\n"
            "z1, z2 = (torch.randn(9, 5, requires_grad=True) for _ in range(2))\n"
            "fastclr.nt_xent_fused(z1, z2, 0.3).backward()\n"
            "print(json.dumps({'file': fastclr.__file__, 'ext': fastclr.extension_available(),\n"
            "                  'grad': bool(z1.grad.abs().sum() > 0), 'error': fastclr.extension_error()}))")
    got = json.loads(run([str(py), "-c", code], cwd=work).splitlines()[-1])
    assert got["file"].startswith(str(venv)) and got["grad"], got
    assert got["ext"], got["error"]
    out = run([str(py), "-m", "fastclr.train", "--config", "digits", "--epochs", "1", "--probe-epochs", "2",
               "--no-progress", "--out", str(work / "run")], cwd=work, timeout=600)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["epochs"] == 1 and "knn_top1" in result


def test_extension_built_for_another_torch_is_refused(tmp_path):
    from fastclr import ops
    record = tmp_path / "_C.json"
    record.write_text(json.dumps({"torch": "1.0.0"}))
    assert "built against torch 1.0.0" in ops._build_mismatch(record) and "reinstall" in ops._build_mismatch(record)
    record.write_text(json.dumps({"error": "no compiler"}))
    assert ops._build_mismatch(record) == "no compiler"
    import torch
    record.write_text(json.dumps({"torch": torch.__version__}))
    assert ops._build_mismatch(record) == ""


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "embed"])
def test_commands_without_their_extra_say_which_to_install(tmp_path, monkeypatch, command):
    import fastclr.app as app
    monkeypatch.setitem(app.TRAIN_REQUIREMENTS, "no_such_module_here", "scikit-learn")
    assert app.missing_requirements() == ["scikit-learn"]
    code = ("import fastclr.app as app\n"
            "app.missing_requirements = lambda: ['scikit-learn', 'pyyaml']\n"
            f"import runpy; runpy.run_module('fastclr.{command}', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1
    assert f"python -m fastclr.{command} needs the training extra" in out.stderr, out.stderr
    assert 'pip install "fastclr[train]"' in out.stderr and "scikit-learn, pyyaml" in out.stderr, out.stderr


def test_import_fastclr_needs_torch_alone():
    """The library's import adds no top-level package beyond what torch's own import loaded (the
    training extra's packages included) -- and no triton (imported on first use on a GPU)."""
    code = ("import sys, torch\n"
            "before = set(sys.modules)\n"
            "import fastclr\n"
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['fastclr']", out.stdout + out.stderr
