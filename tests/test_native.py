"""The compiled extension fastkd._C (CPU part), against float64 formulas."""

import math

import pytest
import torch

from fastkd.backends import native
from reference import rel_err

_C = pytest.importorskip("fastkd._C", reason="the compiled extension is not built (FASTKD_BUILD_EXT=0?)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n_rows,vocab", [(1, 1), (7, 1000), (3, 32003)])
def test_row_logsumexp_matches_float64(dtype, n_rows, vocab):
    x = (torch.randn(n_rows, vocab, dtype=torch.float64) * 4).to(dtype)
    out = native.row_logsumexp(x, temperature=1.5)
    assert rel_err(out, torch.logsumexp(x.double() / 1.5, dim=-1)) < 2e-6


def test_row_logsumexp_strided_masked_and_extreme():
    base = torch.randn(6, 500) * 1e4
    base[:, ::3] = -math.inf
    x = base[::2, ::2]  # strided rows and columns
    assert rel_err(native.row_logsumexp(x), torch.logsumexp(x.double(), dim=-1)) < 1e-6
    assert native.row_logsumexp(torch.full((2, 5), -math.inf)).eq(-math.inf).all()


def test_row_logsumexp_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D CPU tensor"):
        native.row_logsumexp(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="float32"):
        native.row_logsumexp(torch.ones(2, 3, dtype=torch.long))


def test_extension_is_torch_abi_free():
    assert _C.with_cuda in (True, False)
    with open(_C.__file__, "rb") as handle:
        assert b"libtorch" not in handle.read()
