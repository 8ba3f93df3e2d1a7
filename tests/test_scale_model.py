"""benchmarks/scale_model.py counts the tiles the kernels compute: its forward and backward tile
counts equal the CPU kernels' own schedule (fastclr::nt_xent_tile_counts) for small cases, full
batch and local rows, both modes; and its FLOP model follows from those counts."""
import pytest
import torch

import fastclr
from benchmarks import scale_model

needs_ext = pytest.mark.skipif(not fastclr.extension_available(), reason="extension not built")


@needs_ext
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "labels"])
@pytest.mark.parametrize("m,world", [(2, 1), (600, 1), (600, 2), (1000, 4), (4096, 4), (6000, 8), (3000, 3)])
def test_tile_counts_match_the_kernels_schedule(paired, m, world):
    span = m // 2 if paired else m
    b = span // world
    for rank in range(world):
        lo, count = rank * b, (span - rank * b if rank == world - 1 else b)
        fwd, diag, off, row_tile, bwd_tile = torch.ops.fastclr.nt_xent_tile_counts(
            m, m // 2 if paired else m, labels=not paired, row_lo=lo, row_count=count)
        assert scale_model.forward_tiles(m, count, paired, row_tile, 1024) == fwd
        assert scale_model.backward_tiles(m, lo, count, paired, bwd_tile) == (diag, off)


def test_flops_follow_from_the_tiles():
    r = scale_model.loss_work("local", 4, 512, 128)
    diag, off = scale_model.backward_tiles(r["M"], 0, 512, True, scale_model.TILE)
    mm = 2 * scale_model.TILE ** 2 * 128
    fwd = 2 * (512 // scale_model.TILE) * (r["M"] // scale_model.TILE)
    assert r["flops"] == fwd * mm + diag * 2 * mm + off * 3 * mm
    full = scale_model.loss_work("replica", 4, 512, 128)
    # W = 4: a replica does 4x the forward but only ~2.3x the backward (a rank's symmetric tiles
    # are 2/W - 1/W^2 of all): 2.76x one rank's share (measured on CPU: 1 / 0.34 = 2.9x)
    assert 2.5 < full["flops"] / r["flops"] < 3
    rows = [scale_model.timings(scale_model.loss_work(d, w, 128, 128))
            for d in ("local", "replica", "ring") for w in (8, 1024)]
    assert all(x["loss_ms"] > 0 and x["link"] == ("NVLink" if x["W"] <= 8 else "InfiniBand") for x in rows)


def test_scaling_doc_table_is_the_scripts_output(capsys):
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    table = readme.split("<!-- scale_model:begin -->\n", 1)[1].split("\n<!-- scale_model:end -->", 1)[0]
    scale_model.main([])
    assert table.strip() == capsys.readouterr().out.strip()


@needs_ext
def test_bench_scale_runs(capsys):
    from benchmarks import bench_scale
    bench_scale.main(["--sizes", "512", "--worlds", "1", "2", "--repeats", "1", "--no-save"])
    out = capsys.readouterr().out
    assert "| ntxent | 512 | 128 | 2 | 256 |" in out and "| supcon | 512 | 128 | 1 | 512 |" in out
    assert "error" not in out and "timeout" not in out
