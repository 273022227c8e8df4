"""GPU matmul with a compressed 2:4 weight (Triton): y = x @ Wᵀ reading 56% of W's bytes.

At the batch sizes of decoding and small-batch serving the matmul is bound by reading the weight, so
a 2:4 weight stored compressed (`prune.sparse24_ops`: the kept values as two planes plus a 4-bit code
per group of 4) can be read in about half the time. Each program loads a [BLOCK_N, BLOCK_K] tile of
the compressed weight, expands it in registers (each of the 4 positions of a group takes the first
or second kept value, or zero) and feeds the dense tile to the tensor cores. This does not use the
sparse tensor cores (torch's semi-structured tensors do; on an H100 with torch 2.11 they ran 2-20x
slower than dense, see BENCHMARKS.md): the gain here is bytes, so it is largest at small batch.

Tile sizes are chosen per (rows bucket, N, K, dtype) by timing the candidates once on the device
(`tune`), as triton.autotune does, but over whole calls, so split-K's reduction is counted. On CPU
the same kernel runs under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with CUDA builds of torch; CPU-only installs lack it
    triton = None

log = logging.getLogger(__name__)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
K_MULTIPLE = 32  # the narrowest tile's BLOCK_K


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = True  # load the next tile before expanding this one (Triton does not pipeline these loads)

    def fits(self, k: int) -> bool:
        return k % (self.block_k * self.split_k) == 0


def rows_bucket(rows: int) -> int:
    """Tuned configs are shared by row counts in the same power-of-two bucket (at least 16: tl.dot's minimum)."""
    return max(16, 1 << (rows - 1).bit_length())


def candidates(rows: int) -> list[TileConfig]:
    """Tiles to time, best guesses first; the last ones only fit narrow layers (K of 32 or 64)."""
    narrow = [TileConfig(min(rows_bucket(rows), 64), 32, bk, 1, 4, 2) for bk in (64, 32)]
    if rows <= 64:  # weight-bound: many programs over N (and over K for the narrow down projection)
        block_m = rows_bucket(rows)
        tiles = [(16, 256, 1, 4), (32, 128, 1, 4), (32, 256, 1, 4), (64, 128, 1, 4), (64, 256, 1, 8), (128, 128, 1, 8),
                 (16, 256, 2, 4), (32, 128, 2, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 2, 8), (64, 256, 4, 8),
                 (16, 128, 4, 4)]
        return [TileConfig(block_m, bn, bk, split, warps, 3, prefetch)
                for prefetch in (True, False) for bn, bk, split, warps in tiles] + narrow
    # prompts: compute-bound, dense-GEMM-like tiles (larger ones spill registers in the expansion)
    return [TileConfig(bm, bn, bk, 1, warps, stages, prefetch=False)
            for bm, bn, bk, warps, stages in [
                (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
                (64, 128, 128, 8, 3)]] + narrow


_tuned: dict[tuple, TileConfig] = {}


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, config: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] @ W.T with W [N, K] given compressed; returns [..., N] in x's dtype."""
    if triton is None:
        raise RuntimeError("the 2:4 kernel needs triton (it comes with CUDA builds of torch: pip install triton)")
    n, k = values.shape[1], values.shape[2] * 4
    if x.shape[-1] != k or x.dtype != values.dtype:
        raise ValueError(f"input [..., {x.shape[-1]}] {x.dtype} does not match the 2:4 weight [{n}, {k}] {values.dtype}")
    flat, values, meta = x.reshape(-1, k).contiguous(), values.contiguous(), meta.contiguous()
    if flat.shape[0] == 0:  # a launch grid cannot be empty
        return x.new_empty(*x.shape[:-1], n)
    config = config or choose(flat.shape[0], values, meta)
    out = _launch(flat, values, meta, config)
    return out.reshape(*x.shape[:-1], n)


def choose(rows: int, values: torch.Tensor, meta: torch.Tensor) -> TileConfig:
    n, k = values.shape[1], values.shape[2] * 4
    key = (rows_bucket(rows), n, k, values.dtype, values.device)
    if key not in _tuned:
        fitting = [c for c in candidates(rows) if c.fits(k)]
        if not fitting:
            raise ValueError(f"no 2:4 tile fits K={k}: it must be a multiple of {K_MULTIPLE}")
        if INTERPRETED or len(fitting) == 1:
            return _tuned.setdefault(key, fitting[0])
        if torch.cuda.is_current_stream_capturing():  # timing would synchronize inside a CUDA graph capture
            log.warning("2:4 kernel: first call for %d rows (N=%d, K=%d) inside a CUDA graph capture; using %s "
                        "untuned for it (call the model once outside capture to tune)", rows, n, k, fitting[0])
            return fitting[0]
        _tuned[key] = tune(rows, values, meta, fitting)
    return _tuned[key]


def tune(rows: int, values: torch.Tensor, meta: torch.Tensor, configs: list[TileConfig]) -> TileConfig:
    """The fastest config on this device for this shape, each timed as a whole call (do_bench: median of
    repeats, L2 flushed between them)."""
    n, k = values.shape[1], values.shape[2] * 4
    x = torch.randn(rows_bucket(rows), k, device=values.device, dtype=values.dtype)
    timings, failures = {}, {}
    for config in configs:
        try:
            timings[config] = triton.testing.do_bench(lambda: _launch(x, values, meta, config), warmup=5, rep=20)
        except Exception as exc:  # a tile this GPU cannot hold (shared memory, registers) is not a candidate
            failures[config] = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    if not timings:
        raise RuntimeError(f"no 2:4 kernel config runs for N={n}, K={k} on this GPU; first failure: "
                           f"{next(iter(failures.values()))}")
    best = min(timings, key=timings.get)
    log.info("2:4 kernel, %d rows, N=%d, K=%d: %s (%.4f ms; %d tiles timed, %d could not run%s)", rows_bucket(rows), n,
             k, best, timings[best], len(timings), len(failures),
             f", e.g. {next(iter(failures.values()))}" if failures else "")
    return best


def _launch(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, config: TileConfig) -> torch.Tensor:
    rows, k = x.shape
    n = values.shape[1]
    # split-K partial sums meet in float32 through atomics, then one cast
    out = torch.zeros(rows, n, device=x.device, dtype=torch.float32) if config.split_k > 1 else \
        torch.empty(rows, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(rows, config.block_m), config.split_k)
    _sparse24_kernel[grid](x, values, meta, out, rows, n, k, values.stride(0), x.stride(0), values.stride(1),
                           meta.stride(0), out.stride(0), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                           BLOCK_K=config.block_k, SPLIT_K=config.split_k, PREFETCH=config.prefetch,
                           num_warps=config.num_warps, num_stages=config.num_stages)
    return out.to(x.dtype) if config.split_k > 1 else out


if triton is not None:
    # an opaque op for torch.compile: the tuner's timing runs (first call per shape) stay out of traced graphs
    @torch.library.custom_op("leanlm_gpu::sparse24_mm", mutates_args=())
    def sparse24_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return sparse24_mm(x, values, meta)

    @sparse24_op.register_fake
    def _(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], values.shape[1])

    @triton.jit
    def _load_tile(x_ptr, v_ptr, meta_ptr, k0, rm, rn, row_ok, col_ok, plane_stride, stride_xm, stride_vn,
                   stride_meta, BLOCK_K: tl.constexpr):
        """Inputs [BLOCK_M, BLOCK_K] and the compressed weight tile at k0."""
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=row_ok, other=0.0)
        offsets = rn[:, None] * stride_vn + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
        first_value = tl.load(v_ptr + offsets, mask=col_ok, other=0.0)
        second_value = tl.load(v_ptr + plane_stride + offsets, mask=col_ok, other=0.0)
        packed = tl.load(meta_ptr + rn[:, None] * stride_meta + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :],
                         mask=col_ok, other=0)
        return x, first_value, second_value, packed

    @triton.jit
    def _expand(first_value, second_value, packed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dense [BLOCK_N, BLOCK_K] weight tile: each position takes the first or second kept value, or 0."""
        codes = tl.interleave(packed & 15, packed >> 4)
        first, second = codes & 3, codes >> 2
        zero = tl.zeros_like(first_value)
        # positions ascend within a group: 0 can only be the first kept, 3 only the second
        at0 = tl.where(first == 0, first_value, zero)
        at1 = tl.where(first == 1, first_value, tl.where(second == 1, second_value, zero))
        at2 = tl.where(first == 2, first_value, tl.where(second == 2, second_value, zero))
        at3 = tl.where(second == 3, second_value, zero)
        return tl.reshape(tl.join(tl.join(at0, at2), tl.join(at1, at3)), (BLOCK_N, BLOCK_K))

    @triton.jit
    def _sparse24_kernel(x_ptr, v_ptr, meta_ptr, out_ptr, M, N, K, plane_stride, stride_xm, stride_vn, stride_meta,
                         stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rm[:, None] < M
        col_ok = rn[:, None] < N
        strides = (plane_stride, stride_xm, stride_vn, stride_meta)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = tl.program_id(2) * (K // SPLIT_K)
        end = start + K // SPLIT_K
        if PREFETCH:
            x, a, b, codes = _load_tile(x_ptr, v_ptr, meta_ptr, start, rm, rn, row_ok, col_ok, *strides, BLOCK_K)
            for k0 in range(start, end, BLOCK_K):
                # the last iteration reloads its own tile rather than read past its span
                nxt = tl.minimum(k0 + BLOCK_K, end - BLOCK_K)
                nx, na, nb, ncodes = _load_tile(x_ptr, v_ptr, meta_ptr, nxt, rm, rn, row_ok, col_ok, *strides, BLOCK_K)
                acc += tl.dot(x, tl.trans(_expand(a, b, codes, BLOCK_N, BLOCK_K)))
                x, a, b, codes = nx, na, nb, ncodes
        else:
            for k0 in range(start, end, BLOCK_K):
                x, a, b, codes = _load_tile(x_ptr, v_ptr, meta_ptr, k0, rm, rn, row_ok, col_ok, *strides, BLOCK_K)
                acc += tl.dot(x, tl.trans(_expand(a, b, codes, BLOCK_N, BLOCK_K)))
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        o_mask = row_ok & (rn[None, :] < N)
        if SPLIT_K == 1:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.atomic_add(o_ptrs, acc, mask=o_mask)
