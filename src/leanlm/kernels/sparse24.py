"""GPU matmul with a compressed 2:4 weight (Triton): y = x @ Wᵀ reading 56% of W's bytes.

At the batch sizes of decoding and small-batch serving the matmul is bound by reading the weight, so
a 2:4 weight stored compressed (`sparse24_ops`: each group's two kept values as one 32-bit word
plus 4 flag bits) can be read in about half the time. Each program loads a [BLOCK_N, BLOCK_K] tile
of the compressed weight, expands each group's word into its two output words in registers (a shift,
a select and a mask each) and feeds the dense tile to the tensor cores. This does not use the sparse
tensor cores (torch's semi-structured tensors do; on an H100 with torch 2.11 they ran 2-20x slower
than dense, see BENCHMARKS.md): the gain here is bytes, so it is largest at small batch, and the
expansion must cost less than the bytes it saves (about 4-6 instructions per weight on sm_90, by the
SASS; see BENCHMARKS.md).

Tile sizes are chosen per (rows bucket, N, K, dtype) by timing the candidates once on the device
(`tune`), as triton.autotune does, but over whole calls, so split-K's reduction is counted. On CPU
the same kernel runs under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from leanlm.kernels.sparse24_ops import (
    decompress_24,  # the format's reference math, to check each tile
)

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with CUDA builds of torch; CPU-only installs lack it
    triton = None

log = logging.getLogger(__name__)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
K_MULTIPLE = 32  # the narrowest tile's BLOCK_K
WRONG = 2e-2  # relative error of a tile that computes something else (half precision rounding: ~1e-3)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    # the weight tile as the tensor cores' M side and the rows as their N side: at a few rows no MMA
    # work is spent on padding rows, and on Hopper the expanded weight feeds wgmma directly
    swap_ab: bool = False
    # load the next tile's weights into registers before expanding this one: bytes in flight without
    # the shared-memory traffic of Triton's own pipelining (num_stages > 1)
    prefetch: bool = False
    # expand the whole weight (block_n x block_k tiles), then one dense matmul: for prompts, where the
    # tensor cores' speed counts more than bytes and cuBLAS may beat the fused tiles
    expand_first: bool = False

    def fits(self, k: int) -> bool:
        return k % (self.block_k * self.split_k) == 0


def rows_bucket(rows: int) -> int:
    """Tuned configs are shared by row counts in the same power-of-two bucket (at least 16: tl.dot's minimum)."""
    return max(16, 1 << (rows - 1).bit_length())


# (block_n, block_k, split_k, warps, stages, prefetch). Reading HBM at full speed needs ~2 MB in flight
# on an H100 (3.35 TB/s x ~0.7 us), while a 64x128 tile is 9 KB and a Llama-1B projection makes only
# 16-128 such tiles. Hence: pipelined tiles (2-3 stages in flight, 5.6-6.8 SASS instructions per weight
# on sm_90 by benchmarks/sass_sparse24.py), register-prefetched and plain unpipelined ones (4.1-4.8;
# several programs per SM hide latency), and split-K (more programs, at the cost of a zeroed float32
# output and a cast). Which is fastest depends on latency, so the tuner decides on the device.
DECODE_TILES = [(64, 128, 1, 4, 3, False), (128, 64, 1, 4, 3, False), (128, 128, 1, 8, 3, False),
                (64, 256, 1, 4, 3, False), (32, 256, 1, 4, 3, False), (32, 512, 1, 4, 2, False),
                (128, 64, 1, 4, 1, True), (256, 64, 1, 8, 1, True), (128, 128, 1, 8, 1, True), (64, 128, 1, 4, 1, True),
                (128, 64, 1, 4, 1, False), (256, 64, 1, 8, 1, False), (128, 128, 1, 8, 1, False),
                (64, 128, 1, 4, 1, False), (64, 256, 1, 4, 1, False),
                (128, 64, 8, 4, 1, False), (128, 128, 4, 8, 1, False), (64, 128, 4, 4, 1, False),
                (64, 128, 8, 4, 1, False), (32, 256, 4, 4, 2, False)]
# (block_m, block_n, block_k, warps, stages); larger ones spill registers on sm_80
PROMPT_TILES = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 128, 8, 3), (64, 64, 64, 4, 3),
                (128, 128, 32, 4, 3)]


def candidates(rows: int) -> list[TileConfig]:
    """Tiles to time, best guesses first; the last ones only fit narrow layers (K of 32 or 64)."""
    narrow = [TileConfig(min(rows_bucket(rows), 64), 32, bk, 1, 4, 2) for bk in (64, 32)]
    if rows <= 64:  # weight-bound: many programs over N (and over K for the narrow down projection)
        return [TileConfig(rows_bucket(rows), bn, bk, split, warps, stages, swap_ab=True, prefetch=prefetch)
                for bn, bk, split, warps, stages, prefetch in DECODE_TILES] + narrow
    # prompts: compute-bound, dense-GEMM-like tiles, or the weight expanded for cuBLAS
    expand = [TileConfig(rows_bucket(rows), bn, bk, expand_first=True) for bn, bk in ((64, 128), (64, 64))]
    return [TileConfig(bm, bn, bk, 1, warps, stages) for bm, bn, bk, warps, stages in PROMPT_TILES] + expand + narrow


_tuned: dict[tuple, TileConfig] = {}


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, config: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] @ W.T with W [N, K] given compressed; returns [..., N] in x's dtype."""
    if triton is None:
        raise RuntimeError("the 2:4 kernel needs triton (it comes with CUDA builds of torch: pip install triton)")
    n, k = values.shape[0], values.shape[1] * 2
    if x.shape[-1] != k or x.dtype != values.dtype:
        raise ValueError(f"input [..., {x.shape[-1]}] {x.dtype} does not match the 2:4 weight [{n}, {k}] {values.dtype}")
    if values.element_size() != 2:
        raise ValueError(f"the 2:4 kernel multiplies float16 or bfloat16 weights, got {values.dtype}")
    flat, values, meta = x.reshape(-1, k).contiguous(), values.contiguous(), meta.contiguous()
    if flat.shape[0] == 0:  # a launch grid cannot be empty
        return x.new_empty(*x.shape[:-1], n)
    config = config or choose(flat.shape[0], values, meta)
    out = _launch(flat, values, meta, config)
    return out.reshape(*x.shape[:-1], n)


def choose(rows: int, values: torch.Tensor, meta: torch.Tensor) -> TileConfig:
    n, k = values.shape[0], values.shape[1] * 2
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
    repeats, L2 flushed between them). Each is first checked against the dense product: a tile that
    this GPU or compiler gets wrong is dropped, with a warning, rather than chosen for its speed."""
    n, k = values.shape[0], values.shape[1] * 2
    x = torch.randn(rows_bucket(rows), k, device=values.device, dtype=values.dtype)
    want = x.float() @ decompress_24(values, meta).float().T
    scale = want.abs().max().clamp_min(1e-6)
    timings, failures, wrong = {}, {}, {}
    for config in configs:
        try:
            error = ((_launch(x, values, meta, config).float() - want).abs().max() / scale).item()
            if not error < WRONG:
                wrong[config] = error
                continue
            timings[config] = triton.testing.do_bench(lambda: _launch(x, values, meta, config), warmup=5, rep=20)
        except Exception as exc:  # a tile this GPU cannot hold (shared memory, registers) is not a candidate
            failures[config] = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    if wrong:
        log.warning("2:4 kernel, N=%d, K=%d: %d tiles computed wrong results on this device and were dropped, "
                    "e.g. %s (relative error %.2g)", n, k, len(wrong), *next(iter(wrong.items())))
    if not timings:
        raise RuntimeError(f"no 2:4 kernel config runs correctly for N={n}, K={k} on this GPU; "
                           f"{len(failures)} failed to run, {len(wrong)} computed wrong results"
                           + (f"; first failure: {next(iter(failures.values()))}" if failures else ""))
    best = min(timings, key=timings.get)
    log.info("2:4 kernel, %d rows, N=%d, K=%d: %s (%.4f ms; %d tiles timed, %d could not run%s)", rows_bucket(rows), n,
             k, best, timings[best], len(timings), len(failures),
             f", e.g. {next(iter(failures.values()))}" if failures else "")
    return best


def expand_24(values: torch.Tensor, meta: torch.Tensor, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """The dense [N, K] weight from its compressed form, on the GPU (the kernel's own expansion)."""
    n, k = values.shape[0], values.shape[1] * 2
    words, flags = values.contiguous().view(torch.int32), meta.contiguous().view(torch.int32)
    dense = torch.empty(n, k, device=values.device, dtype=values.dtype)
    _expand_kernel[(triton.cdiv(n, block_n), k // block_k)](words, flags, dense, n, words.stride(0), flags.stride(0),
                                                             BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=n % block_n == 0)
    return dense


def _launch(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, config: TileConfig) -> torch.Tensor:
    if config.expand_first:
        return torch.nn.functional.linear(x, expand_24(values, meta, config.block_n, config.block_k))
    rows, k = x.shape
    n = values.shape[0]
    words, flags = values.view(torch.int32), meta.view(torch.int32)  # a group's pair, 8 groups' flags
    # split-K partial sums meet in float32 through atomics, then one cast
    out = torch.zeros(rows, n, device=x.device, dtype=torch.float32) if config.split_k > 1 else \
        torch.empty(rows, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(rows, config.block_m), config.split_k)
    _sparse24_kernel[grid](x, words, flags, out, rows, n, k, x.stride(0), words.stride(0), flags.stride(0),
                           out.stride(0), BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                           SPLIT_K=config.split_k, SWAP_AB=config.swap_ab, EVEN_N=n % config.block_n == 0,
                           PREFETCH=config.prefetch, num_warps=config.num_warps, num_stages=config.num_stages)
    return out.to(x.dtype) if config.split_k > 1 else out


def compile_for(config: TileConfig, arch: int, dtype: str = "fp16"):
    """The kernel compiled ahead of time for an NVIDIA GPU (sm_`arch`; `dtype` "fp16" or "bf16") with
    triton's own ptxas, no GPU needed: for tests and `benchmarks/sass_sparse24.py` to inspect the
    code a GPU would run. Assumes what the launcher assumes of aligned tensors and sizes that are
    multiples of 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if config.expand_first:
        kernel, signature = _expand_kernel, {"w_ptr": "*i32", "meta_ptr": "*i32", "out_ptr": f"*{dtype}", "N": "i32",
                                             "stride_wn": "i32", "stride_meta": "i32"}
        constexprs = {"BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "EVEN_N": True}
    else:
        out = "*fp32" if config.split_k > 1 else f"*{dtype}"
        kernel, signature = _sparse24_kernel, {
            "x_ptr": f"*{dtype}", "w_ptr": "*i32", "meta_ptr": "*i32", "out_ptr": out,
            **dict.fromkeys(["M", "N", "K", "stride_xm", "stride_wn", "stride_meta", "stride_om"], "i32")}
        constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                      "SPLIT_K": config.split_k, "SWAP_AB": config.swap_ab, "EVEN_N": True, "PREFETCH": config.prefetch}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name in signature}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


if triton is not None:
    # an opaque op for torch.compile: the tuner's timing runs (first call per shape) stay out of traced graphs
    @torch.library.custom_op("leanlm_gpu::sparse24_mm", mutates_args=())
    def sparse24_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return sparse24_mm(x, values, meta)

    @sparse24_op.register_fake
    def _(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], values.shape[0])

    @triton.jit
    def _expand(words, flags, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dense [BLOCK_N, BLOCK_K] tile from words [BLOCK_N, BLOCK_K/32, 8] (a group's `first |
        second << 16`) and their flags (the group's 4 bits at the bottom; see sparse24_ops)."""
        # positions (0, 1): the pair, or the first value moved up; then the high half cleared unless used
        pos01 = tl.where((flags & 1) != 0, words, words << 16)
        pos01 = tl.where((flags & 2) != 0, pos01, pos01 & 0xFFFF)
        # positions (2, 3): the pair, or the second value moved down; then the low half cleared unless used
        pos23 = tl.where((flags & 4) != 0, words, words >> 16)
        pos23 = tl.where((flags & 8) != 0, pos23, pos23 & 0xFFFF0000)
        out_words = tl.join(pos01, pos23)
        halves = tl.join((out_words & 0xFFFF).to(tl.uint16), (out_words >> 16).to(tl.uint16))
        return tl.reshape(halves, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _load_weights(w_ptr, meta_ptr, k0, n3, word, group, N, stride_wn, stride_meta, EVEN_N: tl.constexpr):
        """The tile's words [BLOCK_N, BLOCK_K/32, 8] and flag words [BLOCK_N, BLOCK_K/32, 1] at column k0."""
        w_ptrs = w_ptr + n3 * stride_wn + k0 // 4 + word * 8 + group
        m_ptrs = meta_ptr + n3 * stride_meta + k0 // 32 + word
        if EVEN_N:
            return tl.load(w_ptrs), tl.load(m_ptrs)
        return tl.load(w_ptrs, mask=n3 < N, other=0), tl.load(m_ptrs, mask=n3 < N, other=0)

    @triton.jit
    def _expand_kernel(w_ptr, meta_ptr, out_ptr, N, stride_wn, stride_meta, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n3 = rn[:, None, None]
        group = tl.arange(0, 8)[None, None, :]
        words, flag_words = _load_weights(w_ptr, meta_ptr, k0, n3, tl.arange(0, BLOCK_K // 32)[None, :, None], group, N,
                                          stride_wn, stride_meta, EVEN_N)
        tile = _expand(words.to(tl.uint32, bitcast=True), flag_words >> (group * 4), BLOCK_N, BLOCK_K)
        out_ptrs = out_ptr + rn[:, None] * (4 * stride_wn) + k0 + tl.arange(0, BLOCK_K)[None, :]
        tile = tile.to(out_ptr.dtype.element_ty, bitcast=True)
        if EVEN_N:
            tl.store(out_ptrs, tile)
        else:
            tl.store(out_ptrs, tile, mask=rn[:, None] < N)

    @triton.jit
    def _sparse24_kernel(x_ptr, w_ptr, meta_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_meta, stride_om,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_N: tl.constexpr, PREFETCH: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rm[:, None] < M
        n3 = rn[:, None, None]
        word = tl.arange(0, BLOCK_K // 32)[None, :, None]  # flag words of the tile (8 groups each)
        group = tl.arange(0, 8)[None, None, :]
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = tl.program_id(2) * (K // SPLIT_K)
        end = start + K // SPLIT_K
        if PREFETCH:
            words, flag_words = _load_weights(w_ptr, meta_ptr, start, n3, word, group, N, stride_wn, stride_meta, EVEN_N)
        for k0 in range(start, end, BLOCK_K):
            if PREFETCH:  # the next tile's loads go out before this one's expansion (the last reloads its own)
                ahead = tl.minimum(k0 + BLOCK_K, end - BLOCK_K)
                next_words, next_flags = _load_weights(w_ptr, meta_ptr, ahead, n3, word, group, N, stride_wn,
                                                       stride_meta, EVEN_N)
            else:
                words, flag_words = _load_weights(w_ptr, meta_ptr, k0, n3, word, group, N, stride_wn, stride_meta,
                                                  EVEN_N)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=row_ok, other=0.0)
            # a logical shift for the words' high halves
            tile = _expand(words.to(tl.uint32, bitcast=True), flag_words >> (group * 4), BLOCK_N, BLOCK_K)
            tile = tile.to(x_ptr.dtype.element_ty, bitcast=True)
            if SWAP_AB:
                acc += tl.dot(tile, tl.trans(x))
            else:
                acc += tl.dot(x, tl.trans(tile))
            if PREFETCH:
                words, flag_words = next_words, next_flags
        if SWAP_AB:
            o_ptrs = out_ptr + rn[:, None] + rm[None, :] * stride_om
            o_mask = (rn[:, None] < N) & (rm[None, :] < M)
        else:
            o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
            o_mask = row_ok & (rn[None, :] < N)
        if SPLIT_K == 1:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.atomic_add(o_ptrs, acc, mask=o_mask)
