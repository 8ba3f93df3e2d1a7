"""--precision auto / --channels-last auto on a CPU: bf16 autocast and channels-last where the CPU
multiplies bfloat16 natively (and nothing caps it to AVX2), fp32 and contiguous elsewhere and
under --deterministic. The machines running this suite may have either kind of CPU, so the
detection is replaced here, and a tiny run is trained on the fast paths either way."""
import pytest
import torch

from fastclr.app import runtime, train
from test_train import TINY

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
BF16 = torch.bfloat16


@pytest.mark.parametrize("precision, layout, device, native, deterministic, expected", [
    ("auto", "auto", CPU, True, False, (BF16, True)),
    ("auto", "auto", CPU, False, False, (None, False)),   # AVX2 only: bf16 would be emulated
    ("auto", "auto", CPU, True, True, (None, False)),     # --deterministic
    ("auto", "auto", GPU, False, True, (BF16, True)),     # a GPU keeps its bf16 (no exact-resume promise there)
    ("fp32", "auto", CPU, True, False, (None, True)),     # explicit values are taken as given
    ("bf16", "off", CPU, False, True, (BF16, False)),
    ("fp16", "on", CPU, False, False, (torch.float16, True)),
])
def test_what_auto_means(precision, layout, device, native, deterministic, expected):
    assert runtime.fast_paths(precision, layout, device, deterministic=deterministic,
                              native_bf16=native) == expected


@pytest.mark.parametrize("env, expected", [
    ({}, True),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, False),
    ({"FASTCLR_CPU_CAPABILITY": "AVX2"}, False),
    ({"FASTCLR_CPU_CAPABILITY": "default"}, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
    ({"ATEN_CPU_CAPABILITY": "avx512"}, True),
])
def test_caps_emulate_an_avx2_machine(monkeypatch, env, expected):
    """On a CPU with AVX512-BF16, each documented cap makes fastclr choose as on an AVX2 one."""
    for name in ("ATEN_CPU_CAPABILITY", "FASTCLR_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert runtime.cpu_has_native_bf16() is expected
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert runtime.cpu_has_native_bf16() is False  # AVX-512 without bf16 dot products


def test_a_run_on_the_fast_paths_and_under_deterministic(monkeypatch, tmp_path, capsys):
    """A CPU with native bf16 (detection replaced): the run trains under bf16 autocast with
    channels-last and says that resume is then not exact; --deterministic gives fp32 and says
    nothing."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    fast_args = [a for a in TINY if a != "--deterministic"] + ["--epochs", "1", "--probe-epochs", "1"]
    fast = train.main(fast_args + ["--out", str(tmp_path / "fast")])
    out, err = capsys.readouterr()
    assert "not bit-identical" in err and ", bf16; out" in out
    exact = train.main(fast_args + ["--deterministic", "--out", str(tmp_path / "exact")])
    out, err = capsys.readouterr()
    assert "not bit-identical" not in err and ", fp32; out" in out
    assert 0 <= fast["knn_top1"] <= 1 and 0 <= exact["knn_top1"] <= 1
