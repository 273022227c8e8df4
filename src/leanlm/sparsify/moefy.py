"""MoE-fication: split each dense FFN into `experts` equal groups of channels, fit a router that
predicts each expert's contribution from the FFN input, and run only the `top_k` predicted experts per
token (Switch-Transformer-style conditional compute, after MoEfication, Zhang et al. 2022). The
`shared` experts hold the channels that contribute most and run for every token (as DeepSeekMoE's
shared experts); the others are channels that fire together on calibration data (balanced k-means of
their activation patterns). With `refit`, the down projection is then re-solved by least squares for
the channels the router actually runs on the calibration data, so the experts that run also stand in
for those left out. Gated and plain FFNs, fused gate/up projections (Phi-3) and biased FFNs (GPT-2,
GPT-NeoX) are split alike.

Works block by block (core.layerwise); each block is checked to compute exactly its dense FFN when
all experts are on, before routing and the refit are applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.core.anatomy import FFN, ffn_dims, find_ffn
from leanlm.core.layerwise import check_calibration, process_layerwise
from leanlm.core.search import Choice
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import check_arguments, find_structure, replace_module
from leanlm.errors import ConfigError, LeanLMError, UnsupportedModelError
from leanlm.sparsify.moe_ffn import MoEFFN
from leanlm.sparsify.moe_ops import (
    assign_experts,
    expert_contributions,
    fit_router,
    refit_down,
    routed_channels,
    top_recall,
)


@dataclass
class MoefyConfig(StepConfig):
    stage = "act_sparsity"
    search = {"experts": Choice(16, 32, 64), "shared": Choice(4, 8, 12), "top_k": Choice(2, 4, 8)}
    runtimes = ("leanlm",)  # llama.cpp has no dense equivalent of a MoE-fied FFN
    needs_calibration = True
    search_cost = 2
    experts: int = 32
    shared: int = 12  # always-on experts, holding the channels that contribute most
    top_k: int = 4  # routed experts per token, besides the shared ones
    refit: bool = True
    damp: float = 0.01
    rows: int = 32768  # calibration tokens sampled per block: the refit solves for every FFN channel
    batch_size: int = 8

    def validate(self) -> None:
        if self.experts < 2 or not 0 <= self.shared < self.experts - 1:
            raise ConfigError(f"need experts >= 2 and 0 <= shared <= experts - 2 (shared experts always run and at "
                              f"least two must be left to route between; shared defaults to {type(self).shared}), "
                              f"got experts={self.experts}, shared={self.shared}")
        if not 1 <= self.top_k < self.experts - self.shared:
            raise ConfigError(f"need 1 <= top_k < experts - shared = {self.experts - self.shared} (top_k counts the "
                              f"routed experts run per token besides the shared ones), got top_k={self.top_k}")
        if self.rows < 64:
            raise ConfigError(f"rows must be at least 64, got {self.rows}")

    def check(self, model: nn.Module | None) -> None:
        if model is None:
            return
        hidden, intermediate = ffn_dims(model, "MoE-fication")
        ffn_activation(model.config)
        if intermediate % self.experts:
            raise ConfigError(f"intermediate size {intermediate} does not split into {self.experts} equal experts; "
                              f"expert counts that do: {', '.join(map(str, _splits(intermediate)))}")
        first = find_structure(model).blocks[0]
        mlp_of(first, find_ffn(first, hidden, intermediate))  # refuse an FFN without its own module


    def opaque_modules(self, model: nn.Module) -> dict[str, str]:
        hidden, intermediate = ffn_dims(model, "MoE-fication")
        structure = find_structure(model)
        return {f"{prefix}.{mlp_of(block, find_ffn(block, hidden, intermediate))[0]}": MoEFFN.__name__
                for prefix, block in zip(structure.block_names(), structure.blocks)}


def _splits(width: int) -> list[int]:
    return [k for k in (2, 4, 8, 16, 32, 64, 128) if width % k == 0]


class FFNRecorder:
    """Pairs of (FFN input, intermediate activations) at the same sampled token positions."""

    def __init__(self, mlp: nn.Module, reducer: nn.Module, rows_per_call: int, seed: int = 0):
        self.mlp, self.reducer, self.rows = mlp, reducer, rows_per_call
        self.x: list[torch.Tensor] = []
        self.h: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def __enter__(self) -> "FFNRecorder":
        self._handles = [self.reducer.register_forward_pre_hook(self._grab_h),
                         self.mlp.register_forward_hook(self._pair)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _grab_h(self, module, args):
        self._pending = args[0].detach()

    def _pair(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        h = self._pending.reshape(x.shape[0], -1)
        pick = torch.randperm(x.shape[0], generator=self._gen)[: self.rows].to(x.device)
        self.x.append(x[pick].float().cpu())
        self.h.append(h[pick].float().cpu())


def mlp_of(block: nn.Module, ffn: FFN) -> tuple[str, nn.Module]:
    """The smallest module of the block holding all of the FFN's linears (and nothing else that computes)."""
    names = [*ffn.expanders, ffn.reducer[0]]
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    name = ".".join(common)
    if not name:
        raise UnsupportedModelError(
            f"the FFN linears {names} of {type(block).__name__} sit directly in the block, beside its attention; "
            "MoE-fication replaces the module that holds the FFN, and this architecture has none")
    return name, block.get_submodule(name)


def ffn_activation(config) -> str:
    """The FFN's activation by its config name (Gemma calls it hidden_activation, GPT-2 and OPT
    activation_function, most others hidden_act); the exactness check of each block catches a wrong one."""
    from transformers.activations import ACT2FN

    keys = ("hidden_activation", "hidden_act", "activation_function")
    for key in keys:
        name = getattr(config, key, None)
        if isinstance(name, str) and name in ACT2FN:
            return name
    raise UnsupportedModelError(f"{type(config).__name__} names no known FFN activation in any of {list(keys)}; "
                                "MoE-fication needs it to rebuild the FFN as experts")


@dataclass
class Rows:
    """The rows of an expanding linear (or one half of a fused gate/up) that feed the FFN channels."""
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def bias_of(self, cols: torch.Tensor) -> torch.Tensor:
        return self.bias[cols] if self.bias is not None else self.weight.new_zeros(len(cols))


def expander_rows(ffn: FFN) -> list[Rows]:
    """Each expander's rows; a fused gate/up projection (Phi-3) counts as its two halves."""
    parts = []
    for name, linear in ffn.expanders.items():
        halves = 2 if name in ffn.fused() else 1
        weights = linear.weight.chunk(halves)
        biases = linear.bias.chunk(halves) if linear.bias is not None else [None] * halves
        parts += [Rows(w, b) for w, b in zip(weights, biases)]
    return parts


def gate_and_up(ffn: FFN, activation: str, x: torch.Tensor, h: torch.Tensor) -> tuple[Rows, Rows | None]:
    """Which expander rows are the gate: the assignment that reproduces the recorded activations."""
    from transformers.activations import ACT2FN

    act = ACT2FN[activation]
    parts = expander_rows(ffn)
    if len(parts) == 1:
        candidates = [(parts[0], None)]
    elif len(parts) == 2:
        candidates = [(parts[0], parts[1]), (parts[1], parts[0])]
    else:
        raise UnsupportedModelError(f"an FFN with {len(parts)} expanding projections is not supported (1 or 2)")
    with torch.no_grad():
        for gate, up in candidates:
            rec = act(gate(x)) * up(x) if up is not None else act(gate(x))
            if (rec - h).abs().max() <= 1e-3 * max(h.abs().max().item(), 1.0):
                return gate, up
    raise UnsupportedModelError(f"the FFN does not compute down({activation}(gate x) * up x) or down({activation}(up x)); "
                                "cannot split it into experts")


def build_moe(ffn: FFN, gate: Rows, up: Rows | None, assign: torch.Tensor, router, config: MoefyConfig,
              activation: str) -> MoEFFN:
    down = ffn.reducer[1]
    w, parts = down.weight, [gate] + ([up] if up is not None else [])
    biased = down.bias is not None or any(p.bias is not None for p in parts)
    moe = MoEFFN(w.shape[0], w.shape[1], config.experts, config.top_k, up is not None, activation, w.dtype, w.device,
                 bias=biased, shared=config.shared)
    with torch.no_grad():
        for e in range(config.experts):
            cols = (assign == e).nonzero().squeeze(1).to(w.device)
            moe.expand[e].copy_(torch.cat([p.weight[cols] for p in parts]))
            if biased:
                moe.expand_bias[e].copy_(torch.cat([p.bias_of(cols) for p in parts]))
        set_down(moe, w, assign)
        if biased:
            moe.reduce_bias.copy_(down.bias) if down.bias is not None else moe.reduce_bias.zero_()
        moe.router.copy_(router[0])
        moe.router_bias.copy_(router[1])
    return moe


@torch.no_grad()
def set_down(moe: MoEFFN, weight: torch.Tensor, assign: torch.Tensor) -> None:
    """Each expert's down-projection rows from a [hidden, intermediate] weight."""
    for e in range(moe.experts):
        moe.reduce_t[e].copy_(weight[:, (assign == e).nonzero().squeeze(1).to(weight.device)].T)


def check_all_experts(moe: MoEFFN, observe, expected: list[torch.Tensor], index: int) -> None:
    """With every expert on, the block must compute what it did with the dense FFN."""
    routed = moe.top_k
    moe.top_k = moe.experts - moe.shared
    try:
        diff = (observe(limit=1)[0] - expected[0]).abs().max().item()
    finally:
        moe.top_k = routed
    if diff > 1e-3 * max(expected[0].abs().max().item(), 1.0):
        raise LeanLMError(f"block {index}: the experts together differ from the dense FFN by {diff:.3g}")


def relative_error(h: torch.Tensor, keep: torch.Tensor, routed: torch.Tensor, target: torch.Tensor) -> float:
    """||routed(keep * h) - target|| / ||target|| over calibration rows, target the dense down projection's
    output."""
    return ((h * keep) @ routed.T - target).norm().item() / max(target.norm().item(), 1e-12)


def check_enough_tokens(calibration: torch.Tensor, hidden: int) -> None:
    # each router is a least-squares map from the hidden state, fitted on 80% of the tokens and checked
    # on the rest: with fewer tokens than inputs it fits noise and its recall means nothing
    need = 2 * (hidden + 1)
    if calibration.numel() < need:
        raise ConfigError(f"MoE-fication fits each block's router, a linear map from {hidden} hidden inputs, on the "
                          f"calibration tokens: {calibration.numel()} tokens ({calibration.shape[0]} samples x "
                          f"{calibration.shape[1]}) are too few, give at least {need}")


def moefy_(model: nn.Module, config: MoefyConfig, calibration: torch.Tensor, device=None) -> dict:
    check_arguments("moefy_", model, config, MoefyConfig)
    check_calibration(model, config, calibration)
    config.check(model)
    hidden, intermediate = ffn_dims(model, "MoE-fication")
    check_enough_tokens(calibration, hidden)
    activation = ffn_activation(model.config)
    per_call = -(-config.rows // -(-calibration.shape[0] // config.batch_size))

    def one_block(index: int, block: nn.Module, observe) -> dict:
        ffn = find_ffn(block, hidden, intermediate)
        name, mlp = mlp_of(block, ffn)
        down = ffn.reducer[1]
        with FFNRecorder(mlp, down, per_call, seed=index) as rec:
            expected = observe()
        x, h = torch.cat(rec.x), torch.cat(rec.h)
        gate, up = gate_and_up(ffn, activation, x[:256].to(down.weight), h[:256].to(down.weight))
        weight = down.weight.detach().float().cpu()
        assign = assign_experts(h, weight, config.experts, config.shared, seed=index)
        targets = expert_contributions(h, weight, assign, config.experts)[:, config.shared:]
        split = int(0.8 * len(x))
        router = fit_router(x[:split], targets[:split])
        recall = top_recall(x[split:] @ router[0].T + router[1], targets[split:], config.top_k)
        moe = build_moe(ffn, gate, up, assign, router, config, activation)
        replace_module(block, name, moe)
        check_all_experts(moe, observe, expected, index)
        keep = routed_channels(x @ router[0].T + router[1], assign, config.shared, config.top_k)
        target = h @ weight.T
        stats = {"router_recall": recall, "ffn_error": relative_error(h, keep, weight, target)}
        if config.refit:
            refit = refit_down(h, weight, keep, config.damp)
            set_down(moe, refit, assign)
            stats["ffn_error_refit"] = relative_error(h, keep, refit, target)
        return stats

    results = process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size,
                                desc="MoE-fication")
    return summarize(config, results)


def summarize(config: MoefyConfig, results: list[dict]) -> dict:
    def mean(key: str) -> float:
        return round(sum(r[key] for r in results) / len(results), 4)

    stats = {"experts": config.experts, "shared": config.shared, "top_k": config.top_k,
             "ffn_fraction_per_token": (config.shared + config.top_k) / config.experts,
             "router_recall_mean": mean("router_recall"),
             "router_recall": [round(r["router_recall"], 4) for r in results],
             "ffn_error_mean": mean("ffn_error")}
    if config.refit:
        stats["ffn_error_refit_mean"] = mean("ffn_error_refit")
    return stats


register_step("moefy", MoefyConfig, moefy_)
