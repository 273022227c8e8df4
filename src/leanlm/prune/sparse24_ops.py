"""Pure tensor math of the compressed 2:4 weight format that leanlm's GPU kernel reads.

A 2:4 weight [N, K] keeps at most 2 of every 4 consecutive inputs of a row. It is stored as
- `values` [2, N, K/4]: the first and the second kept value of each group of 4, as two planes (so the
  kernel loads each with one contiguous read), and
- `meta` [N, K/8] uint8: per group a 4-bit code `first | second << 2` of the two kept positions
  (first < second; a group with fewer than 2 nonzeros keeps zeros at unused positions), two groups per
  byte, the even group in the low nibble.
That is 2 + 0.25 bytes per 2 kept half-precision weights: 56% of the dense bytes.
"""

from __future__ import annotations

import torch

GROUP = 4
GROUPS_PER_BYTE = 2


def violations_24(weight: torch.Tensor) -> int:
    """How many groups of 4 consecutive inputs hold more than 2 nonzeros (0: the weight is 2:4)."""
    check_shape(weight)
    nonzero = (weight != 0).reshape(weight.shape[0], -1, GROUP).sum(-1)
    return int((nonzero > 2).sum())


def check_shape(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"a 2:4 weight is a matrix [out, in], got shape {tuple(weight.shape)}")
    if weight.shape[1] % (GROUP * GROUPS_PER_BYTE):
        raise ValueError(f"the compressed 2:4 format needs the input dimension to be a multiple of "
                         f"{GROUP * GROUPS_PER_BYTE}, got {weight.shape[1]}")


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [2, N, K/4], meta [N, K/8] uint8) of a 2:4 weight; raises if it is not 2:4."""
    bad = violations_24(weight)
    if bad:
        raise ValueError(f"weight {tuple(weight.shape)} is not 2:4: {bad} groups of 4 inputs hold more than "
                         "2 nonzeros; prune it with pattern '2:4' first")
    rows = weight.shape[0]
    groups = weight.reshape(rows, -1, GROUP)
    # nonzeros first; ties (zeros) broken towards low positions so each group's two picks are distinct
    rank = (groups != 0).to(torch.float32) * GROUP - torch.arange(GROUP, device=weight.device)
    picks = rank.topk(2, dim=-1).indices.sort(dim=-1).values
    kept = groups.gather(-1, picks)
    values = kept.permute(2, 0, 1).contiguous()
    codes = (picks[..., 0] | (picks[..., 1] << 2)).to(torch.uint8)
    meta = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return values, meta.contiguous()


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] weight back from its compressed form (exact)."""
    planes, rows, groups = values.shape
    if planes != 2 or meta.shape != (rows, groups // GROUPS_PER_BYTE):
        raise ValueError(f"compressed 2:4 tensors do not match: values {tuple(values.shape)}, meta {tuple(meta.shape)}")
    codes = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(rows, groups).long()
    dense = values.new_zeros(rows, groups, GROUP)
    dense.scatter_(-1, (codes & 3)[..., None], values[0][..., None])
    dense.scatter_(-1, (codes >> 2)[..., None], values[1][..., None])
    return dense.reshape(rows, groups * GROUP)


def compressed_bytes(values: torch.Tensor, meta: torch.Tensor) -> int:
    return values.numel() * values.element_size() + meta.numel() * meta.element_size()
