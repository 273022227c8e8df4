"""Rotated activation sparsity, the lifecycle glue. Per block, before TEAL's thresholds are calibrated:

- every group of chosen layers that reads a norm's output (q/k/v, gate/up) gets the basis of
  `rotation_ops.output_basis`, from the group's weights and its calibration inputs; the norm is wrapped
  so it emits z = norm(x) @ P and the readers' weights become W P^-T. That costs one [d, d] product
  per group and token (the int8 form reads a quarter of the float bytes).
- the output projection's input (the attention output) gets one such basis per KV group, folded into
  the value projection's rows and the output projection's columns: attention mixes value vectors
  linearly, so the change of basis rides along for free (no extra product at run time).

Dense, the block computes what it did before (to float rounding; checked on a calibration batch for
the attention fold). down_proj's input (act(gate) * up) has no exact change of basis short of a dense
product as large as the layer, so it stays in its own basis.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from leanlm.core.layerwise import HessianCollector
from leanlm.core.scale_pairs import block_pairs
from leanlm.core.structure import is_norm, replace_module
from leanlm.errors import UnsupportedModelError
from leanlm.sparsify.rotated_norm import NormThenRotate
from leanlm.sparsify.rotation_ops import fold_into_readers, output_basis

log = logging.getLogger(__name__)
EXACT = 1e-4  # relative change of the attention output below which a fold counts as exact (float rounding)


def rotate_block(block: nn.Module, layers: dict[str, nn.Module], observe, rotation_dtype: str, counts) -> list[dict]:
    """Rotate what can be rotated in `block` (see the module docstring); returns what was rotated.
    `counts` (prune.heads.Heads, or None) gives the attention's head layout for the value/output fold."""
    modules = dict(block.named_modules())
    pairs = [p for p in block_pairs(block, layers, observe) if is_norm(modules[p.prev])]
    # only the inputs a basis is computed for: the norm-fed groups and the attention projections
    # (down_proj's wide input would cost the most and is never rotated)
    widths = {len(modules[p.prev].weight) for p in pairs} | ({counts.heads * counts.head_dim} if counts else set())
    with HessianCollector(block, {n: m for n, m in layers.items() if m.in_features in widths}) as stats:
        observe()
    done = [_rotate_norm(block, modules, pair, stats, rotation_dtype) for pair in pairs]
    if not pairs:
        log.warning("rotation: no norm in this block feeds only chosen layers; its inputs stay in their own basis")
    if counts is not None:
        done += _rotate_heads(block, layers, stats, counts, observe)
    return done


@torch.no_grad()
def _rotate_norm(block: nn.Module, modules: dict, pair, stats: HessianCollector, rotation_dtype: str) -> dict:
    readers = [modules[n] for n in pair.nexts]
    basis = output_basis([r.weight.data.float() for r in readers], stats.hessian(pair.nexts[0]))
    wrapped = NormThenRotate.build(modules[pair.prev], basis.to(readers[0].weight.device), rotation_dtype)
    applied = wrapped.basis()
    for reader in readers:
        reader.weight.data.copy_(fold_into_readers(reader.weight.data.float(), applied).to(reader.weight.dtype))
    replace_module(block, pair.prev, wrapped)
    return {"input_of": pair.nexts, "extra_product": len(basis)}


@torch.no_grad()
def _rotate_heads(block: nn.Module, layers: dict, stats: HessianCollector, counts, observe) -> list[dict]:
    from leanlm.core.anatomy import find_attention

    hidden = next(iter(layers.values())).in_features
    try:
        attn = find_attention(block, stats, counts, hidden)
    except UnsupportedModelError as err:
        log.warning("rotation: the attention output stays in its own basis (%s)", err)
        return []
    if attn.o not in layers:
        return []
    o = block.get_submodule(attn.o)
    bases = _group_bases(o.weight.data.float(), stats.hessian(attn.o), counts)
    expected = _attention_output(attn.module, observe)
    for name in attn.kv:  # the value projection is the one whose fold leaves the attention output unchanged
        v = block.get_submodule(name)
        tensors = [t for t in (v.weight, v.bias, o.weight) if t is not None]
        saved = [t.data.clone() for t in tensors]
        _fold_heads(v, o, bases, counts)
        # judged on the attention's own output: the block's is dominated by the residual stream
        if (_attention_output(attn.module, observe) - expected).norm() <= EXACT * expected.norm():
            return [{"input_of": [attn.o], "folded_into": name, "extra_product": 0}]
        for t, s in zip(tensors, saved):
            t.data.copy_(s)
    log.warning("rotation: folding a basis into %s changed the block's output; the attention output stays in "
                "its own basis", " or ".join(attn.kv))
    return []


def _attention_output(attention: nn.Module, observe) -> torch.Tensor:
    outputs = []
    handle = attention.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    try:
        observe(limit=1)
    finally:
        handle.remove()
    return outputs[0].float()


def _group_bases(o_weight: torch.Tensor, hessian: torch.Tensor, counts) -> list[torch.Tensor]:
    """One basis per KV group: its query heads read the same value vectors, so they must share it."""
    hd, per = counts.head_dim, counts.heads // counts.kv
    bases = []
    for g in range(counts.kv):
        cols = [slice(h * hd, (h + 1) * hd) for h in range(g * per, (g + 1) * per)]
        cov = sum(hessian[c, c] for c in cols) / per
        bases.append(output_basis([o_weight[:, c] for c in cols], cov))
    return bases


def _fold_heads(v: nn.Linear, o: nn.Linear, bases: list[torch.Tensor], counts) -> None:
    hd, per = counts.head_dim, counts.heads // counts.kv
    for g, basis in enumerate(bases):
        rows = slice(g * hd, (g + 1) * hd)
        p = basis.to(v.weight.device)
        v.weight.data[rows] = (p.T @ v.weight.data[rows].float()).to(v.weight.dtype)
        if v.bias is not None:
            v.bias.data[rows] = (p.T @ v.bias.data[rows].float()).to(v.bias.dtype)
        for h in range(g * per, (g + 1) * per):
            cols = slice(h * hd, (h + 1) * hd)
            o.weight.data[:, cols] = fold_into_readers(o.weight.data[:, cols].float(), p).to(o.weight.dtype)
