"""Pure math of GGUF export: llama.cpp's block layouts built straight from integer codes.

llama.cpp stores a row as blocks of 32 weights. Q8_0: float16 d, then 32 int8 q (w = d q).
Q4_0: float16 d, then 16 bytes whose low nibbles hold weights 0-15 and high nibbles weights
16-31 (w = d (q - 8)). Q4_1: float16 d, float16 m, then the same nibbles (w = d q + m).
leanlm's own codes map onto these exactly when its groups are multiples of 32, so a GPTQ/AWQ
model is written without re-rounding; float weights go through gguf's own quantizers.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32


def _per_block(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Expand [out, groups] scales to one per 32-weight block: [out, in / 32]."""
    blocks = in_features // BLOCK
    groups = scale.shape[1]
    if blocks % groups:
        raise ValueError(f"groups of {in_features // groups} are not a multiple of {BLOCK}")
    return scale.repeat_interleave(blocks // groups, dim=1)


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """Codes 0..15 [out, in] -> [out, blocks, 16] bytes in llama.cpp's order."""
    out, inp = q.shape
    q = q.to(torch.uint8).reshape(out, inp // BLOCK, BLOCK)
    return (q[..., :16] | (q[..., 16:] << 4)).numpy()


def _half_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def q8_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Signed int8 codes [out, in] with scales [out, groups] -> Q8_0 bytes [out, in / 32 * 34]."""
    out, inp = codes.shape
    d = _half_bytes(_per_block(scale.float(), inp))
    q = codes.to(torch.int8).reshape(out, inp // BLOCK, BLOCK).numpy().view(np.uint8)
    return np.concatenate([d, q], axis=-1).reshape(out, -1)


def q4_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Signed codes in [-8, 7] -> Q4_0 bytes [out, in / 32 * 18]."""
    out, inp = codes.shape
    d = _half_bytes(_per_block(scale.float(), inp))
    return np.concatenate([d, _nibbles(codes.to(torch.int16) + 8)], axis=-1).reshape(out, -1)


def q4_1(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    """Unsigned codes in [0, 15] with w = scale (q - zero) -> Q4_1 bytes [out, in / 32 * 20]."""
    out, inp = codes.shape
    s = _per_block(scale.float(), inp)
    m = -s * _per_block(zero.float(), inp)
    return np.concatenate([_half_bytes(s), _half_bytes(m), _nibbles(codes)], axis=-1).reshape(out, -1)


def interleave_rope_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the rows of a q/k projection from HF's rotate-half layout to llama.cpp's pairwise one.

    Within each head HF keeps the two rotary halves apart ([x0..x(h/2-1), y0..]); llama.cpp's
    Llama expects them interleaved ([x0, y0, x1, y1, ...]). Rows move whole, so this works on
    packed blocks as well as on float weights."""
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, 2, per_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def blocks_from_codes(q) -> tuple[np.ndarray, str] | None:
    """llama.cpp blocks written straight from a layer's codes (a core.packed.QuantizedWeight): symmetric
    int8 -> Q8_0, int4 -> Q4_0 when every zero point is 8, else Q4_1; None when no GGUF type holds the
    codes as they are (asymmetric int8, groups that are not a multiple of 32, per-channel int4)."""
    if q.group_size is not None and q.group_size % BLOCK:
        return None
    if q.bits == 8:
        return (q8_0(q.codes, q.scale), "Q8_0") if q.zero is None else None
    if q.bits != 4 or q.group_size is None:
        return None
    if bool((q.zero == 8).all()):
        return q4_0(q.codes.to(torch.int16) - 8, q.scale), "Q4_0"
    return q4_1(q.codes, q.scale, q.zero), "Q4_1"
