"""leanlm's native CPU kernels against the dequantized float matmul they replace."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanlm import kernels
from leanlm.quantize import RTNConfig, quantize_
from leanlm.quantize.int4_linear import Int4Linear, pack_int4
from leanlm.quantize.int8_linear import Int8Linear

pytestmark = pytest.mark.skipif(not kernels.cpu_kernels(), reason=f"leanlm CPU kernels unavailable: {kernels.kernel_status()}")


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _activations(m, k, gen, outlier=False):
    x = torch.randn(m, k, generator=gen)
    if outlier:  # one massive channel, as in real LLM activations
        x[:, 3] = 500.0
    return x


@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (1, 7, 100), (3, 130, 1536), (4, 5, 64), (2, 9, 16)])
@pytest.mark.parametrize("outlier", [False, True])
def test_int8_mm_matches_dequantized(m, n, k, outlier):
    gen = torch.Generator().manual_seed(m * n + k)
    x = _activations(m, k, gen, outlier)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) / 50
    ref = x.double() @ (codes.double() * scale.double()[:, None]).T
    assert _rel_err(kernels.int8_mm(x, codes, scale).double(), ref) < 1e-5


@pytest.mark.parametrize("m,n,k,group", [(1, 576, 576, 64), (1, 5, 576, 32), (1, 33, 256, 128),
                                         (1, 6, 96, 96), (2, 9, 192, 64), (3, 4, 1536, 64)])
@pytest.mark.parametrize("outlier", [False, True])
def test_int4_mm_matches_dequantized(m, n, k, group, outlier):
    gen = torch.Generator().manual_seed(m * n + k + group)
    x = _activations(m, k, gen, outlier)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // group, generator=gen) / 10 + 0.01).half()
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=gen)
    w = (codes.double().view(n, -1, group) - zero.double()[..., None]) * scale.double()[..., None]
    ref = x.double() @ w.view(n, k).T
    # 15-bit activations: below the int4 weights' own error by far; torch's bfloat16
    # kernel errs by ~5e-3 on the outlier cases
    tol = 3e-3 if outlier else 2e-4
    assert _rel_err(kernels.int4_mm(x, pack_int4(codes), scale, zero, group).double(), ref) < tol


def test_zero_activations_give_zero_output():
    codes = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    assert kernels.int8_mm(torch.zeros(1, 64), codes, torch.ones(8)).abs().max().item() == 0.0


def test_bad_inputs_are_refused_with_the_reason():
    codes = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.int8_mm(torch.zeros(1, 64, dtype=torch.float64), codes, torch.ones(4))
    with pytest.raises(RuntimeError, match="one value per output row"):
        kernels.int8_mm(torch.zeros(1, 64), codes, torch.ones(3))
    with pytest.raises(RuntimeError, match="group_size 48"):
        kernels.int4_mm(torch.zeros(1, 96), torch.zeros(4, 48, dtype=torch.uint8),
                        torch.ones(4, 2, dtype=torch.float16), torch.zeros(4, 2, dtype=torch.uint8), 48)


@pytest.mark.parametrize("config", [RTNConfig(bits=8), RTNConfig(bits=4, group_size=64, symmetric=False),
                                    RTNConfig(bits=4, group_size=None, symmetric=False)])
def test_quantized_linear_decode_uses_the_kernel_and_matches(config, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 96))
    quantize_(model, config)
    layer = model[0]
    assert isinstance(layer, (Int8Linear, Int4Linear))
    calls = []
    name = "int8_mm" if isinstance(layer, Int8Linear) else "int4_mm"
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 1, 128)
    out = layer(x)
    assert calls, "batch-1 decode did not reach leanlm's kernel"
    ref = F.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert _rel_err(out, ref) < 2e-4


def test_switch_off_is_honoured(monkeypatch):
    monkeypatch.setenv("LEANLM_CPU_KERNELS", "0")
    ok, reason = kernels._load()
    assert not ok and "LEANLM_CPU_KERNELS=0" in reason


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="torch has no CPU int4 kernel")
def test_int4_mm_is_more_accurate_than_torchs_bfloat16_kernel():
    gen = torch.Generator().manual_seed(7)
    n, k, group = 64, 1536, 64
    x = _activations(1, k, gen, outlier=True)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // group, generator=gen) / 10 + 0.01).half()
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=gen)
    w = (codes.double().view(n, -1, group) - zero.double()[..., None]) * scale.double()[..., None]
    ref = x.double() @ w.view(n, k).T
    tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    sz = torch.stack([scale.float(), (8 - zero.float()) * scale.float()], -1).transpose(0, 1).contiguous()
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), tiles, group, sz.to(torch.bfloat16))
    ours = kernels.int4_mm(x, pack_int4(codes), scale, zero, group)
    assert _rel_err(ours.double(), ref) < _rel_err(theirs.double(), ref) / 3


@pytest.mark.parametrize("k,n", [(576, 1536), (1536, 576), (100, 7)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_sparse_gemv_matches_the_masked_dense_product(k, n, sparsity):
    from leanlm.sparsify.act_sparse_ops import sparsify

    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(k, generator=gen)
    weight_t = torch.randn(k, n, generator=gen)
    norms = torch.rand(k, generator=gen) + 0.5
    score = x.abs() * norms
    threshold = score.quantile(sparsity).reshape(()) if sparsity < 1 else score.max().reshape(())
    want = sparsify(x, threshold, norms) @ weight_t
    got = kernels.sparse_gemv(x, weight_t, threshold, norms)
    torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=0)
    if sparsity == 1.0:
        assert got.abs().max().item() == 0.0


def test_sparse_gemv_refuses_mismatched_shapes():
    with pytest.raises(RuntimeError, match="one contiguous row of 8"):
        kernels.sparse_gemv(torch.zeros(9), torch.zeros(8, 4), torch.zeros(()), torch.ones(8))


def test_a_failed_build_is_a_reason_not_a_crash(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    ok, reason = kernels._load()
    assert not ok and "Ninja is required" in reason


def test_the_portable_path_computes_the_same(tmp_path):
    """Built without AVX-512 (as on a CPU that lacks it), under another op namespace."""
    from torch.utils import cpp_extension

    cpp_extension.load(name="leanlm_portable_test", sources=[str(s) for s in kernels.SOURCES],
                       extra_cflags=["-O1", "-march=x86-64-v2", "-DLEANLM_NAMESPACE=leanlm_portable"],
                       build_directory=str(tmp_path), is_python_module=False)
    ops = torch.ops.leanlm_portable
    assert not ops.simd()
    gen = torch.Generator().manual_seed(3)
    x = _activations(2, 192, gen, outlier=True)
    codes = torch.randint(-127, 128, (9, 192), dtype=torch.int8, generator=gen)
    scale = torch.rand(9, generator=gen) / 50
    torch.testing.assert_close(ops.int8_mm(x, codes, scale), kernels.int8_mm(x, codes, scale), rtol=1e-5, atol=1e-5)
    q = torch.randint(0, 16, (5, 192), dtype=torch.uint8, generator=gen)
    s4 = (torch.rand(5, 3, generator=gen) / 10 + 0.01).half()
    z = torch.randint(0, 16, (5, 3), dtype=torch.uint8, generator=gen)
    want = kernels.int4_mm(x[:1], pack_int4(q), s4, z, 64)
    torch.testing.assert_close(ops.int4_mm(x[:1], pack_int4(q), s4, z, 64), want, rtol=1e-4, atol=1e-4)
    wt = torch.randn(192, 7, generator=gen)
    thr, norms = torch.tensor(0.5), torch.ones(192)
    torch.testing.assert_close(ops.sparse_gemv(x[0], wt, thr, norms), kernels.sparse_gemv(x[0], wt, thr, norms))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_model_cast_to_bfloat16_still_decodes(bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 96))
    quantize_(model, RTNConfig(bits=bits, group_size=None if bits == 8 else 64, symmetric=bits == 8))
    want = model(torch.randn(1, 128, generator=torch.Generator().manual_seed(1)))
    model.to(torch.bfloat16)
    got = model(torch.randn(1, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert _rel_err(got.float(), want) < 2e-2
