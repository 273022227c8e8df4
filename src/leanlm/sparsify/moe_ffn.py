"""Runtime module for a MoE-fied FFN: the dense FFN's channels regrouped into equal experts (each a
contiguous slice), the first `shared` of them always on, a linear router over the others, and the
top-k routed experts computed per token.

One token (batch-1 decode) computes only the shared experts (one product, as they are contiguous) and
its chosen experts' slices, so the FFN bytes read per token scale with (shared + top_k) / experts.
Many tokens compute the full FFN and zero the unchosen experts' channels, the same function, faster
as one matmul. A biased FFN (GPT-2, GPT-NeoX) keeps each channel's bias
with its expert; the output bias is added whatever the router picks, as the dense FFN adds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from leanlm.core.models import register_module


@register_module("moe_ffn")
class MoEFFN(nn.Module):
    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int, gated: bool, activation: str,
                 dtype: torch.dtype = torch.float32, device=None, bias: bool = False, shared: int = 0):
        super().__init__()
        self.hidden, self.intermediate, self.experts, self.top_k = hidden, intermediate, experts, top_k
        self.shared = shared
        self.gated, self.activation, self.has_bias = gated, activation, bias
        self.act = ACT2FN[activation]
        size = intermediate // experts
        # per expert: [gate; up] rows (or up rows), and down's columns stored as rows
        self.expand = nn.Parameter(torch.empty(experts, size * (2 if gated else 1), hidden, dtype=dtype, device=device),
                                   requires_grad=False)
        self.reduce_t = nn.Parameter(torch.empty(experts, size, hidden, dtype=dtype, device=device), requires_grad=False)
        routed = experts - shared
        self.router = nn.Parameter(torch.empty(routed, hidden, dtype=dtype, device=device), requires_grad=False)
        self.router_bias = nn.Parameter(torch.empty(routed, dtype=dtype, device=device), requires_grad=False)
        self.expand_bias = self.reduce_bias = None
        if bias:
            self.expand_bias = nn.Parameter(torch.empty(experts, self.expand.shape[1], dtype=dtype, device=device),
                                            requires_grad=False)
            self.reduce_bias = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def empty(cls, hidden: int, intermediate: int, experts: int, top_k: int, gated: bool, activation: str,
              dtype: str = "float32", bias: bool = False, shared: int = 0) -> "MoEFFN":
        return cls(hidden, intermediate, experts, top_k, gated, activation, getattr(torch, dtype), bias=bias,
                   shared=shared)

    def manifest(self) -> dict:
        return {"hidden": self.hidden, "intermediate": self.intermediate, "experts": self.experts,
                "top_k": self.top_k, "gated": self.gated, "activation": self.activation,
                "dtype": str(self.router.dtype).removeprefix("torch."), "bias": self.has_bias, "shared": self.shared}

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Indices (among all experts) of the top_k routed experts per row of x."""
        return F.linear(x, self.router, self.router_bias).topk(self.top_k, dim=-1).indices + self.shared

    def run_experts(self, flat: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """The summed output of `count` contiguous experts from `first`, as one product each way."""
        expand = self.expand[first : first + count]
        bias = None if self.expand_bias is None else self.expand_bias[first : first + count].reshape(-1)
        pre = F.linear(flat, expand.reshape(-1, self.hidden), bias).reshape(-1, count, expand.shape[1])
        reduce = self.reduce_t[first : first + count].reshape(-1, self.hidden)
        return self.channels(pre).reshape(flat.shape[0], -1) @ reduce

    def channels(self, pre: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.act(pre)
        gate, up = pre.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.hidden)
        chosen = self.route(flat)
        if flat.shape[0] == 1 and not torch.compiler.is_compiling():  # the expert loop reads ids on the host
            out = torch.zeros_like(flat) if self.reduce_bias is None else self.reduce_bias.expand_as(flat).clone()
            if self.shared:
                out += self.run_experts(flat, 0, self.shared)
            for e in chosen[0].tolist():
                out += self.run_experts(flat, e, 1)
            return out.reshape(x.shape)
        size = self.intermediate // self.experts
        bias = None if self.expand_bias is None else self.expand_bias.reshape(-1)
        pre = F.linear(flat, self.expand.reshape(-1, self.hidden), bias).reshape(-1, self.experts, self.expand.shape[1])
        h = self.channels(pre)
        keep = torch.zeros(flat.shape[0], self.experts, 1, dtype=h.dtype, device=h.device)
        keep[:, : self.shared] = 1
        keep.scatter_(1, chosen[..., None], 1)
        out = (h * keep).reshape(-1, self.experts * size) @ self.reduce_t.reshape(-1, self.hidden)
        if self.reduce_bias is not None:
            out += self.reduce_bias
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, intermediate={self.intermediate}, experts={self.experts}, "
                f"shared={self.shared}, top_k={self.top_k}")
