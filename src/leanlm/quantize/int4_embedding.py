"""The input embedding of a model whose tied LM head was quantized to int4: rows looked up from the head's
packed nibbles, group scales and zero points.

The int8 counterpart (int8_embedding.py) explains why: a tied model stores one matrix for both ends, and
once the head is packed the embedding would keep a float copy beside the codes (for SmolLM2-135M, 108 MiB of
float32 next to 15 MiB of int4). A lookup unpacks only the rows it reads.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.core.packed import packed_tensor, register_module
from leanlm.quantize.rtn_ops import dequantize, unpack_int4


@register_module("int4_tied_embedding")
class TiedInt4Embedding(nn.Module):
    # the head's codes: counted there (core.packed.parameter_count counts a tied matrix once)
    PACKED = ("qweight", "scale", "zero")

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None,
                 dtype: torch.dtype = torch.float32, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group_size, self.compute_dtype, self.padding_idx = group_size, dtype, padding_idx
        groups = 1 if group_size is None else embedding_dim // group_size
        self.qweight = packed_tensor(torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8))
        self.scale = packed_tensor(torch.empty(num_embeddings, groups, dtype=torch.float16))
        self.zero = packed_tensor(torch.empty(num_embeddings, groups, dtype=torch.uint8))

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, group_size: int | None = None,
              dtype: str = "float32", padding_idx: int | None = None) -> TiedInt4Embedding:
        """Filled by the checkpoint's aliases: the same tensors as the head's."""
        return cls(num_embeddings, embedding_dim, group_size, getattr(torch, dtype), padding_idx)

    @classmethod
    def sharing(cls, head: nn.Module, padding_idx: int | None = None) -> TiedInt4Embedding:
        """An embedding over `head`'s parameters themselves (not copies): saved once, moved together."""
        module = cls(head.out_features, head.in_features, head.group_size, head.compute_dtype, padding_idx)
        module.qweight, module.scale, module.zero = head.qweight, head.scale, head.zero
        return module

    def manifest(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "group_size": self.group_size, "dtype": str(self.compute_dtype).removeprefix("torch."),
                "padding_idx": self.padding_idx}

    def packed_params(self) -> int:
        return 0  # the tied head's codes, which count them

    def _rows(self, flat: torch.Tensor) -> torch.Tensor:
        codes = unpack_int4(self.qweight[flat])
        return dequantize(codes, self.scale[flat].float(), self.zero[flat].float(), self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The whole matrix in float, for code that reads an embedding's weight (GGUF export): allocates it."""
        return self._rows(torch.arange(self.num_embeddings, device=self.qweight.device)).to(self.compute_dtype)

    def dequantized_module(self) -> nn.Embedding:
        """A plain embedding holding the rows this one computes (for exports to other runtimes)."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, dtype=self.compute_dtype,
                                 device=self.qweight.device)
        with torch.no_grad():
            embedding.weight.copy_(self.weight)
        return embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows(ids.reshape(-1))
        return rows.to(self.compute_dtype).view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, *args, **kwargs):
        # a cast of the whole model (model.to(bfloat16)) sets the dtype the rows come out in, as it does for
        # the head's compute dtype; the codes and scales keep theirs (packed tensors)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits=4, group_size={self.group_size}, "
                "tied to the LM head's codes")
