"""Pure tensor math of the compressed 2:4 weight format that leanlm's GPU kernel reads.

A 2:4 weight [N, K] keeps at most 2 of every 4 consecutive inputs of a row. It is stored as
- `values` [N, K/2]: the first and the second kept value of each group of 4, side by side, so one
  32-bit word holds a half-precision group (`first | second << 16`), and
- `meta` [N, K/8] uint8: 4 flag bits per group, two groups per byte (the even group in the low nibble;
  read as little-endian 32-bit words, group j of a word sits at bits 4j..4j+3). The flags say how the
  word becomes the group's two output words, positions (0, 1) and (2, 3), with a shift, a select and
  a mask each (see `expand_words`):
    bit 0: position 0 holds the first value      bit 1: position 1 holds a value
    bit 2: position 3 holds the second value     bit 3: position 2 holds a value
  A group with fewer than 2 nonzeros keeps zeros at unused positions.
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
    """(values [N, K/2], meta [N, K/8] uint8) of a 2:4 weight; raises if it is not 2:4."""
    bad = violations_24(weight)
    if bad:
        raise ValueError(f"weight {tuple(weight.shape)} is not 2:4: {bad} groups of 4 inputs hold more than "
                         "2 nonzeros; prune it with pattern '2:4' first")
    rows = weight.shape[0]
    groups = weight.reshape(rows, -1, GROUP)
    # nonzeros first; ties (zeros) broken towards low positions so each group's two picks are distinct
    rank = (groups != 0).to(torch.float32) * GROUP - torch.arange(GROUP, device=weight.device)
    first, second = rank.topk(2, dim=-1).indices.sort(dim=-1).values.unbind(-1)
    values = torch.stack([groups.gather(-1, first[..., None]), groups.gather(-1, second[..., None])], -1)
    flags = ((first == 0).int() | ((first == 1) | (second == 1)).int() << 1 | (second == 3).int() << 2
             | ((first == 2) | (second == 2)).int() << 3).to(torch.uint8)
    meta = flags[:, 0::2] | (flags[:, 1::2] << 4)
    return values.reshape(rows, -1).contiguous(), meta.contiguous()


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] weight back from its compressed form (exact)."""
    if values.dim() != 2 or values.shape[1] % 4 or meta.shape != (values.shape[0], values.shape[1] // 4):
        raise ValueError(f"compressed 2:4 tensors do not match: values {tuple(values.shape)}, meta {tuple(meta.shape)}")
    rows, groups = values.shape[0], values.shape[1] // 2
    flags = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(rows, groups).long()
    # a position-1 value is the first kept one unless position 0 holds it; likewise for position 2
    first = torch.where(flags & 1 > 0, 0, torch.where(flags & 2 > 0, 1, 2))
    second = torch.where(flags & 4 > 0, 3, torch.where(flags & 8 > 0, 2, 1))
    pairs = values.reshape(rows, groups, 2)
    dense = values.new_zeros(rows, groups, GROUP)
    dense.scatter_(-1, first[..., None], pairs[..., :1])
    dense.scatter_(-1, second[..., None], pairs[..., 1:])
    return dense.reshape(rows, groups * GROUP)


def expand_words(words: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's expansion on int64 tensors holding 32-bit words, for tests: each group's word
    `first | second << 16` and its 4 flag bits give its output words for positions (0, 1) and (2, 3)."""
    pos01 = torch.where(flags & 1 > 0, words, (words & 0xFFFF) << 16)
    pos01 = torch.where(flags & 2 > 0, pos01, pos01 & 0xFFFF)
    pos23 = torch.where(flags & 4 > 0, words, words >> 16)
    pos23 = torch.where(flags & 8 > 0, pos23, pos23 & 0xFFFF0000)
    return pos01, pos23


def compressed_bytes(values: torch.Tensor, meta: torch.Tensor) -> int:
    return values.numel() * values.element_size() + meta.numel() * meta.element_size()
