"""The input embedding of a model whose tied LM head was quantized to int8: rows looked up from the head's
own codes and scales.

A tied model stores one matrix for both ends. Once the head is packed, the embedding would otherwise keep a
float copy of that matrix beside the codes: for SmolLM2-135M, 113 MB of float32 next to 28 MB of int8, more
than half of an int8 checkpoint. Looking rows up from the codes costs a gather and a multiply per token, and
the input side sees the rounding the head already has.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.core.packed import packed_tensor, register_module
from leanlm.quantize.rtn_ops import dequantize


@register_module("int8_tied_embedding")
class TiedInt8Embedding(nn.Module):
    # the head's codes: counted there (core.packed.parameter_count counts a tied matrix once)
    PACKED = ("qweight", "scale", "zero")

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None, symmetric: bool,
                 dtype: torch.dtype = torch.float32, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group_size, self.symmetric, self.padding_idx = group_size, symmetric, padding_idx
        groups = 1 if group_size is None else embedding_dim // group_size
        self.qweight = packed_tensor(torch.empty(num_embeddings, embedding_dim,
                                                 dtype=torch.int8 if symmetric else torch.uint8))
        self.scale = packed_tensor(torch.empty(num_embeddings, groups, dtype=dtype))
        self.zero = None if symmetric else packed_tensor(torch.empty(num_embeddings, groups, dtype=dtype))

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, group_size: int | None = None, symmetric: bool = True,
              dtype: str = "float32", padding_idx: int | None = None) -> TiedInt8Embedding:
        """Filled by the checkpoint's aliases: the same tensors as the head's."""
        return cls(num_embeddings, embedding_dim, group_size, symmetric, getattr(torch, dtype), padding_idx)

    @classmethod
    def sharing(cls, head: nn.Module, padding_idx: int | None = None) -> TiedInt8Embedding:
        """An embedding over `head`'s parameters themselves (not copies): saved once, moved together."""
        module = cls(head.out_features, head.in_features, head.group_size, head.symmetric, head.scale.dtype,
                     padding_idx)
        module.qweight, module.scale, module.zero = head.qweight, head.scale, head.zero
        return module

    def manifest(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "dtype": str(self.scale.dtype).removeprefix("torch."), "padding_idx": self.padding_idx}

    def packed_params(self) -> int:
        return 0  # the tied head's codes, which count them

    @property
    def weight(self) -> torch.Tensor:
        """The whole matrix in float, for code that reads an embedding's weight (GGUF export): allocates it."""
        zero = None if self.zero is None else self.zero.float()
        return dequantize(self.qweight, self.scale.float(), zero, self.group_size).to(self.scale.dtype)

    def dequantized_module(self) -> nn.Embedding:
        """A plain embedding holding the rows this one computes (for exports to other runtimes)."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, dtype=self.scale.dtype,
                                 device=self.qweight.device)
        with torch.no_grad():
            embedding.weight.copy_(self.weight)
        return embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        zero = None if self.zero is None else self.zero[flat].float()
        rows = dequantize(self.qweight[flat], self.scale[flat].float(), zero, self.group_size)
        return rows.to(self.scale.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits=8, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, tied to the LM head's codes")
