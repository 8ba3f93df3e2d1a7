"""What the Triton kernels share (fastclr/triton/common.py): 64-bit row offsets that do not wrap
where M x D passes 2^31."""
import pytest
import torch

from fastclr import ops

if ops.triton_interpreting():
    import triton
    import triton.language as tl
    from fastclr.triton.common import row_offset

    @triton.jit
    def _offsets_kernel(rows_ptr, out_ptr, stride, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, row_offset(tl.load(rows_ptr + i), stride))


@pytest.mark.skipif(not ops.triton_interpreting(), reason="runs the Triton interpreter on CPU tensors")
def test_triton_row_offsets_do_not_wrap_at_2_31():
    rows = torch.tensor([0, 1, 2**21 - 1, 2**21, 2**21 + 7, 2**22, 2**30, 2**31 - 1], dtype=torch.int32)
    out = torch.empty(8, dtype=torch.int64)
    _offsets_kernel[(1,)](rows, out, 1024, BLOCK=8)
    assert out.tolist() == [r * 1024 for r in rows.tolist()]  # 2N D = 2^21 * 1024 = 2^31 and past
