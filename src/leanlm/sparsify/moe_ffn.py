"""Runtime module for a MoE-fied FFN: the dense FFN's channels regrouped into equal experts (each a
contiguous slice), the first `shared` of them always on, a linear router over the others, and the
top-k routed experts computed per token.

One token (batch-1 decode) computes only the shared experts (one product, as they are contiguous) and
its chosen experts' slices, so the FFN bytes read per token scale with (shared + top_k) / experts
(not in bfloat16: see BF16_GROUPED_MIN_ROWS).

Many tokens (prompts, batched decode) on the CPU run the shared experts on every row and each routed
expert on just the rows that chose it, all routed experts in one grouped product (torch's
`F.grouped_mm`, where it runs on the CPU). Per-expert Python products cost more in dispatch than they
save below ~100 rows, and rows padded to the busiest expert lose it all to the router's imbalance (the
busiest expert often gets 3-5x the mean). Elsewhere (another device, bfloat16 below 512 rows, an
older torch or a dtype it does not run on the CPU, experts whose rows are not a multiple of 16 bytes,
a compiled graph, whose shapes must not depend on the routing) the full FFN runs and the unchosen
experts' channels are zeroed: the same function.

A biased FFN (GPT-2, GPT-NeoX) keeps each channel's bias with its expert; the output bias is added
whatever the router picks, as the dense FFN adds it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from leanlm.core.packed import register_module
from leanlm.sparsify import moe_ops

# bfloat16 products run on oneDNN (AMX where the CPU has it), which grouped_mm's CPU path does not use:
# masked was faster below this (BENCHMARKS.md, session 17: grouped 0.51x at 8 rows, 0.93x at 256, 1.22x at
# 512), and at one row even than the expert loop (18.6 against 22.7 ms for the 30 FFNs)
BF16_GROUPED_MIN_ROWS = 512


@functools.cache
def cpu_grouped_mm(dtype: torch.dtype):
    """torch's F.grouped_mm if this torch has it and runs it on the CPU in `dtype` (it came CUDA-first,
    bfloat16 only), else None."""
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None:
        return None
    rows, weights = torch.ones(3, 8, dtype=dtype), torch.ones(2, 8, 8, dtype=dtype)
    try:
        out = grouped_mm(rows, weights, offs=torch.tensor([1, 3], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return None
    return grouped_mm if torch.equal(out, torch.full((3, 8), 8.0, dtype=dtype)) else None


@register_module("moe_ffn")
class MoEFFN(nn.Module):
    # stacked expert weights: methods that work one nn.Linear at a time (quantization, pruning) cannot
    # reach them, and select_layers refuses a selection that would silently leave them out
    opaque_weights = ("expand", "reduce_t")

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
        if flat.shape[0] == 1 and flat.dtype != torch.bfloat16 and not torch.compiler.is_compiling():
            out = self.run_one_token(flat, chosen[0].tolist())  # the expert loop reads ids on the host
        elif self.groupable(flat):
            out = self.run_grouped(flat, chosen)
        else:
            out = self.run_masked(flat, chosen)
        return out.reshape(x.shape)

    def groupable(self, flat: torch.Tensor) -> bool:
        """Whether many rows can run as one grouped product: F.grouped_mm on the CPU, outside a compiled
        graph, in a dtype it supports there, with every row of its operands a multiple of 16 bytes (an expert
        of 48 float32 channels is), and in bfloat16 only from BF16_GROUPED_MIN_ROWS rows."""
        width = flat.element_size()
        if flat.dtype == torch.bfloat16 and flat.shape[0] < BF16_GROUPED_MIN_ROWS:
            return False
        return (flat.device.type == "cpu" and not torch.compiler.is_compiling()
                and cpu_grouped_mm(flat.dtype) is not None
                and (self.hidden * width) % 16 == 0 and (self.intermediate // self.experts * width) % 16 == 0)

    def start(self, flat: torch.Tensor) -> torch.Tensor:
        """The output bias plus the shared experts: what every row gets whatever the router picks."""
        out = torch.zeros_like(flat) if self.reduce_bias is None else self.reduce_bias.expand_as(flat).clone()
        if self.shared:
            out += self.run_experts(flat, 0, self.shared)
        return out

    def run_one_token(self, flat: torch.Tensor, chosen: list[int]) -> torch.Tensor:
        out = self.start(flat)
        for e in chosen:
            out += self.run_experts(flat, e, 1)
        return out

    def run_grouped(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        first = self.shared
        rows, ids, ends = moe_ops.expert_groups(chosen - first, self.experts - first)
        pre = cpu_grouped_mm(flat.dtype)(flat[rows], self.expand[first:].transpose(1, 2), offs=ends)
        if self.expand_bias is not None:  # grouped_mm takes no bias on the CPU
            pre = pre + self.expand_bias[first:][ids]
        routed = cpu_grouped_mm(flat.dtype)(self.channels(pre), self.reduce_t[first:], offs=ends)
        return self.start(flat).index_add_(0, rows, routed)

    def run_masked(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        size = self.intermediate // self.experts
        bias = None if self.expand_bias is None else self.expand_bias.reshape(-1)
        pre = F.linear(flat, self.expand.reshape(-1, self.hidden), bias).reshape(-1, self.experts, self.expand.shape[1])
        h = self.channels(pre)
        keep = torch.zeros(flat.shape[0], self.experts, 1, dtype=h.dtype, device=h.device)
        keep[:, : self.shared] = 1
        keep.scatter_(1, chosen[..., None], 1)
        out = (h * keep).reshape(-1, self.experts * size) @ self.reduce_t.reshape(-1, self.hidden)
        return out if self.reduce_bias is None else out + self.reduce_bias

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, intermediate={self.intermediate}, experts={self.experts}, "
                f"shared={self.shared}, top_k={self.top_k}")
