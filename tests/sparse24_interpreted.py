"""Runs leanlm's Triton 2:4 kernel under Triton's CPU interpreter; test_sparse24.py starts it in a fresh
process (`python -m tests.sparse24_interpreted`) (TRITON_INTERPRET must be set before triton compiles anything). Exits non-zero on any mismatch."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from leanlm.kernels import sparse24 as kernel  # noqa: E402
from leanlm.kernels.sparse24_ops import compress_24  # noqa: E402
from leanlm.prune.prune_ops import magnitude_mask  # noqa: E402


def pruned(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w = w.masked_fill(magnitude_mask(w, 0.5, (2, 4)), 0)
    w[0, :8] = 0  # groups with no nonzero and with one: unused positions must stay zero
    w[1, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])
    for row, pattern in enumerate([[1.0, -2.0, 0, 0], [1.0, 0, -2.0, 0], [1.0, 0, 0, -2.0], [0, 1.0, -2.0, 0],
                                   [0, 1.0, 0, -2.0], [0, 0, 1.0, -2.0]], start=2):  # every pair of positions
        w[row % n, :4] = torch.tensor(pattern)
    return w.to(dtype)


def check(rows: int, n: int, k: int, dtype: torch.dtype, config=None) -> float:
    w = pruned(n, k, dtype, seed=rows + n + k)
    x = torch.randn(rows, k).to(dtype)
    values, meta = compress_24(w)
    got = kernel.sparse24_mm(x, values, meta, config).float()
    want = x.float() @ w.float().T
    err = ((got - want).abs().max() / want.abs().max()).item()
    limit = 2e-3
    if not err < limit:
        sys.exit(f"2:4 kernel mismatch: rows={rows} N={n} K={k} {dtype} config={config}: relative error {err:.2e}")
    return err


def check_model() -> None:
    """A tiny 2:4-pruned Llama in float16: converted layers through the kernel give the dense logits."""
    from leanlm.prune import MagnitudeConfig, prune_
    from leanlm.sparsify import sparse24_
    from leanlm.sparsify.sparse24 import Sparse24Linear
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab_size=96)
    prune_(model, MagnitudeConfig(pattern="2:4"))
    model = model.half()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        report = sparse24_(model)
        got = model(input_ids=ids).logits.float()
    if report["kernel"] != "leanlm triton 2:4" or not isinstance(model.model.layers[0].mlp.down_proj, Sparse24Linear):
        sys.exit(f"the model was not converted to the kernel: {report}")
    err = ((got - want).abs().max() / want.abs().max()).item()
    if not err < 5e-3:
        sys.exit(f"2:4 model logits differ from the dense pruned model: relative error {err:.2e}")
    # the kernel is one opaque op to torch.compile: a whole graph, no break, same logits
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        again = compiled(input_ids=ids).logits.float()
    if not torch.equal(again, got):
        sys.exit("the compiled 2:4 model computes something else than the eager one")


def main() -> None:
    assert kernel.INTERPRETED and kernel.triton is not None
    for rows, n, k in [(1, 64, 256), (5, 48, 512), (70, 64, 256), (3, 40, 64), (2, 24, 32)]:
        check(rows, n, k, torch.float16)
    try:
        kernel.sparse24_mm(torch.randn(2, 64), *compress_24(pruned(32, 64, torch.float32, seed=0)))
        sys.exit("float32 weights must be refused: the kernel reads 16-bit pairs as 32-bit words")
    except ValueError:
        pass
    values, meta = compress_24(pruned(32, 64, torch.float16, seed=0))
    if kernel.sparse24_mm(torch.empty(2, 0, 64, dtype=torch.float16), values, meta).shape != (2, 0, 32):
        sys.exit("an empty input must give an empty output")
    # every tile shape the tuner may pick, split-K included, on a shape each of them fits
    for config in kernel.candidates(16) + kernel.candidates(200):
        rows = 16 if config.block_m <= 16 else 80
        check(rows, 2 * config.block_n + 8, config.block_k * config.split_k * 2, torch.float16, config)
        check(rows, 2 * config.block_n, config.block_k * config.split_k, torch.float16, config)  # N a tile multiple
    check_model()
    print("ok")


if __name__ == "__main__":
    main()
