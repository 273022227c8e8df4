"""leanlm's native CPU kernels for batch-1 decode: int8 and int4 weight-only matmuls (`cpu_gemv.cpp`)
and the activation-sparse matrix-vector product (`sparse_gemv.cpp`). The GPU's 2:4 matmul is a Triton
kernel in `sparse24.py`.

They are compiled on first use with this machine's C++ compiler (torch.utils.cpp_extension, about
10 s once, then cached) for its own instruction set. `cpu_kernels()` says whether they can be used:
where they cannot be built, or the CPU lacks AVX-512 VNNI, it warns once with the reason and the
quantized modules keep using torch's packed kernels. `LEANLM_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(name) for name in ("cpu_gemv.cpp", "sparse_gemv.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # at::parallel_for splits rows over threads only with OpenMP

_available: bool | None = None
_reason = "not loaded yet"


def cpu_kernels() -> bool:
    """True when leanlm's CPU kernels are built and this CPU runs their SIMD path."""
    global _available, _reason
    if _available is None:
        if torch.compiler.is_compiling():  # never build inside a trace; the eager path decides first
            return False
        _available, _reason = _load()
        if not _available:
            warnings.warn(f"leanlm's CPU int8/int4 kernels are not used: {_reason}; torch's packed "
                          "kernels run instead (slower decode)", RuntimeWarning, stacklevel=2)
    return _available


def kernel_status() -> str:
    """One line for reports: which CPU kernels quantized layers use, and why."""
    cpu_kernels()
    return "leanlm AVX-512 VNNI" if _available else f"torch packed ({_reason})"


def _load() -> tuple[bool, str]:
    if os.environ.get("LEANLM_CPU_KERNELS", "1") == "0":
        return False, "turned off by LEANLM_CPU_KERNELS=0"
    try:
        from torch.utils import cpp_extension

        log.info("loading leanlm's CPU kernels (compiled on first use, then cached by torch)")
        cpp_extension.load(name=_build_name(), sources=[str(s) for s in SOURCES], extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # no compiler, no ninja, no OpenMP: each is a reason, not a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"building them failed ({first})"
    if not torch.ops.leanlm.simd():
        return False, "this CPU has no AVX-512 VNNI"
    _register_fakes()
    return True, "built"


def _build_name() -> str:
    """-march=native binaries must not be shared between CPUs (a home directory mounted on several
    machines would hand an AVX-512 build to a CPU without it): the build cache is keyed by the CPU."""
    cpu = f"{platform.machine()}_{torch.backends.cpu.get_cpu_capability()}".lower()
    return "leanlm_cpu_kernels_" + "".join(c if c.isalnum() else "_" for c in cpu)


def _register_fakes() -> None:
    """Output shapes for torch.compile, which traces the ops without running them."""

    @torch.library.register_fake("leanlm::int8_mm")
    def _int8_mm(x, codes, scale):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("leanlm::int4_mm")
    def _int4_mm(x, packed, scale, zero, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("leanlm::sparse_gemv")
    def _sparse_gemv(x, weight_t, threshold, norms):
        return x.new_empty(weight_t.shape[1])


def on_rows(kernel, x: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """Run a [M, K] -> [M, N] matmul kernel on x's rows converted to `dtype`; the result comes back in
    x's shape and dtype, plus the bias: the glue every packed linear layer needs around its kernel."""
    out = kernel(x.reshape(-1, in_features).to(dtype).contiguous())
    out = out.reshape(*x.shape[:-1], out_features).to(x.dtype)
    return out if bias is None else out + bias


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ (codes [N, K] int8 * scale [N] float32).T -> [M, N] float32."""
    return torch.ops.leanlm.int8_mm(x, codes, scale)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x [M, K] float32 @ ((unpack(packed) - zero) * scale, by groups of `group_size` columns).T -> [M, N]."""
    return torch.ops.leanlm.int4_mm(x, packed, scale, zero, group_size)


def sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """sum over inputs k with |x_k| * norms_k > threshold of x_k * weight_t[k] (x: K float32 values)."""
    return torch.ops.leanlm.sparse_gemv(x, weight_t, threshold, norms)
