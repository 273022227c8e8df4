"""llama.cpp's K-quants, quantized here (the `gguf` package only dequantizes them). Rows are cut into
super-blocks of 256 weights:

- Q4_K (144 bytes, 4.5 bits per weight): float16 d and dmin, then eight 6-bit scales and eight 6-bit
  mins packed in 12 bytes, then 128 bytes of nibbles; sub-block j (32 weights) decodes as
  w = d sc_j q - dmin m_j with q in 0..15.
- Q6_K (210 bytes, 6.5625 bits per weight): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs,
  sixteen int8 scales and a float16 d; sub-block j (16 weights) decodes as w = d sc_j (q - 32).

Each sub-block's range is searched over a few clipping factors for the least squared error,
weighted per input column by `importance` when given (llama.cpp's importance matrix: the mean
squared activation of each input), then the sub-block scales are themselves quantized and the codes
recomputed against them, so the error is measured on what llama.cpp will decode.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
CLIPS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)


def _weights(w: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    if importance is None:
        return torch.ones_like(w)
    return importance.float().clamp(min=1e-12).expand_as(w)


def _best(candidates: list[tuple[torch.Tensor, ...]], errors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    pick = torch.stack(errors).argmin(0)
    return tuple(torch.stack([c[i] for c in candidates]).gather(0, pick[None]).squeeze(0)
                 for i in range(len(candidates[0])))


def q4_k_params(w: torch.Tensor, imp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (rows of `w`, 32 weights) a float scale and min (w ~ scale q - min, min >= 0)."""
    lo, hi = w.min(-1).values.clamp(max=0), w.max(-1).values.clamp(min=0)
    candidates, errors = [], []
    for clip in CLIPS:
        scale = ((hi - lo) * clip / 15).clamp(min=1e-12)
        mn = -lo * clip
        q = ((w + mn[:, None]) / scale[:, None]).round().clamp(0, 15)
        errors.append((imp * (scale[:, None] * q - mn[:, None] - w) ** 2).sum(-1))
        candidates.append((scale, mn))
    return _best(candidates, errors)


def _six_bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[blocks, 8] non-negative values -> float16-representable super scale and 6-bit codes."""
    top = values.max(-1).values
    d = (top / 63).to(torch.float16).float()
    codes = torch.where(d[:, None] > 0, (values / d.clamp(min=1e-30)[:, None]).round(), 0).clamp(0, 63)
    return d, codes


def quantize_q4_k(weight: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
    """[out, in] float weights (in a multiple of 256) -> Q4_K bytes [out, in / 256 * 144]."""
    out, inp = weight.shape
    w = weight.float().reshape(-1, 32)
    imp = _weights(weight.float(), importance).reshape(-1, 32)
    scale, mn = q4_k_params(w, imp)
    d, sc = _six_bit(scale.reshape(-1, 8))
    dmin, m = _six_bit(mn.reshape(-1, 8))
    step = (d[:, None] * sc).reshape(-1, 1)
    offset = (dmin[:, None] * m).reshape(-1, 1)
    q = torch.where(step > 0, ((w + offset) / step.clamp(min=1e-30)).round(), 0).clamp(0, 15).to(torch.uint8)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    packed = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                        (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], dim=1)
    blocks = np.concatenate([_f16(d), _f16(dmin), packed.numpy(), qs.numpy()], axis=1)
    return blocks.reshape(out, inp // QK_K * 144)


def quantize_q6_k(weight: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
    """[out, in] float weights (in a multiple of 256) -> Q6_K bytes [out, in / 256 * 210]."""
    out, inp = weight.shape
    w = weight.float().reshape(-1, 16)
    imp = _weights(weight.float(), importance).reshape(-1, 16)
    top = w.abs().max(-1).values
    candidates, errors = [], []
    for clip in CLIPS:
        scale = (top * clip / 32).clamp(min=1e-12)
        q = (w / scale[:, None]).round().clamp(-32, 31)
        errors.append((imp * (scale[:, None] * q - w) ** 2).sum(-1))
        candidates.append((scale,))
    (scale,) = _best(candidates, errors)
    scale = scale.reshape(-1, 16)
    d = (scale.max(-1).values / 127).to(torch.float16).float()
    sc = torch.where(d[:, None] > 0, (scale / d.clamp(min=1e-30)[:, None]).round(), 0).clamp(-128, 127)
    step = (d[:, None] * sc).reshape(-1, 1)
    q = torch.where(step > 0, (w / step.clamp(min=1e-30)).round(), 0).clamp(-32, 31)
    u = (q + 32).to(torch.uint8).reshape(-1, 8, 32)  # row r of 32 weights, as Q6_K's decoder reads them
    low, high = u & 0x0F, u >> 4
    ql = torch.stack([low[:, 0:2] | (low[:, 2:4] << 4), low[:, 4:6] | (low[:, 6:8] << 4)], dim=1).reshape(-1, 128)
    qh = torch.stack([_pairs(high[:, 0:4]), _pairs(high[:, 4:8])], dim=1).reshape(-1, 64)
    blocks = np.concatenate([ql.numpy(), qh.numpy(), sc.to(torch.int8).numpy().view(np.uint8), _f16(d)], axis=1)
    return blocks.reshape(out, inp // QK_K * 210)


def _pairs(high: torch.Tensor) -> torch.Tensor:
    """[blocks, 4, 32] 2-bit values -> [blocks, 32] bytes, value k in bits 2k..2k+1."""
    return high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)


def _f16(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(-1, 2)
