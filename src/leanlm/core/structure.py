"""Find a causal LM's parts from its module graph, for any Llama/Qwen/Mistral/Gemma/Phi-style model.

No per-architecture tables: the decoder blocks are the largest `nn.ModuleList` of identical
modules that contain linear layers; embeddings and LM head come from the HF accessors; norms
are recognised by their class name. Algorithm code asks this module, never `model.model.layers`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanlm.errors import ConfigError, DataError, UnsupportedModelError


def check_arguments(verb: str, model: Any, config: Any = None, expected: type | None = None) -> None:
    """Refuse, before any work, a call whose model is not a torch module or whose config is of another type
    (either would otherwise fail as an AttributeError deep inside)."""
    if not isinstance(model, nn.Module):
        held = isinstance(getattr(model, "model", None), nn.Module)
        fix = "pass its .model, the nn.Module it holds" if held else "e.g. leanlm.load_model(path).model"
        raise ConfigError(f"{verb}: the model must be a torch nn.Module (a causal LM); got {type(model).__name__}: {fix}")
    if expected is not None and not isinstance(config, expected):
        raise ConfigError(f"{verb}: the config must be a {expected.__name__}, got {type(config).__name__}")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear and GPT-2 style Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer storing its weight as [in, out]."""
    return type(module).__name__ == "Conv1D"


def is_projection(module: nn.Module) -> bool:
    """A linear layer in float or in any packed form (leanlm's quantized modules keep in/out_features)."""
    return is_linear(module) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith("norm")


@dataclass
class ModelStructure:
    blocks_name: str
    blocks: nn.ModuleList
    embeddings_name: str | None
    lm_head_name: str | None
    final_norm_name: str | None

    def block_names(self) -> list[str]:
        return [f"{self.blocks_name}.{i}" for i in range(len(self.blocks))]

    def block_linears(self, index: int) -> dict[str, nn.Module]:
        """Linear layers of one block, keyed by their name relative to the block."""
        return {n: m for n, m in self.blocks[index].named_modules() if is_linear(m)}

    def block_norms(self, index: int) -> dict[str, nn.Module]:
        return {n: m for n, m in self.blocks[index].named_modules() if n and is_norm(m)}


def find_structure(model: nn.Module) -> ModelStructure:
    blocks_name, blocks = _find_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return ModelStructure(
        blocks_name=blocks_name,
        blocks=blocks,
        embeddings_name=names.get(id(embed)) if embed is not None else None,
        lm_head_name=names.get(id(head)) if head is not None else None,
        final_norm_name=_find_final_norm(model, blocks_name),
    )


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(is_projection(m) for m in module[0].modules()):
            continue
        size = sum(t.numel() for t in [*module.parameters(), *module.buffers()])  # packed weights are buffers
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise UnsupportedModelError(
            f"could not find the decoder blocks of {type(model).__name__}: looked for a torch.nn.ModuleList "
            "of identical modules that each contain linear layers, and found none"
        )
    return best


def _find_final_norm(model: nn.Module, blocks_name: str) -> str | None:
    last = None
    for name, module in model.named_modules():
        if name.startswith(blocks_name + ".") or not is_norm(module):
            continue
        last = name
    return last


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name` under `root`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_linear(m)}


def matches(name: str, patterns: list[str]) -> bool:
    """Glob match (`*.mlp.*`), also against the last name component (`lm_head`)."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def opaque_modules(model: nn.Module) -> dict[str, str]:
    """Modules (name -> kind) that hold weights outside any linear layer (a MoE-fied FFN's stacked
    experts), which methods working one linear layer at a time cannot reach."""
    return {n: type(m).__name__ for n, m in model.named_modules() if getattr(m, "opaque_weights", ())}


def refuse_opaque(modules: dict[str, str], targets: list[str], skip: list[str], verb: str,
                  fix: str | None = None) -> None:
    """A per-linear step whose selection takes in opaque `modules` would leave them as they are without
    a word; `fix` says what to do instead (default: the `skip` pattern that leaves them out)."""
    hit = [n for n in modules if matches(n, targets) and not matches(n, skip)]
    if hit:
        pattern = "*." + hit[0].rsplit(".", 1)[-1]
        fix = fix or f"add {pattern!r} to 'skip' to {verb} the other layers and leave these as they are"
        raise ConfigError(f"cannot {verb} the weights inside {len(hit)} {modules[hit[0]]} module(s) ({hit[0]}, ...): "
                          f"they are not linear layers; {fix}")


def check_config_describes(model: nn.Module, what: str) -> None:
    """After a structural change: a model built from the updated config must have the pruned model's
    parameter shapes, or the saved model would not load. Some architectures derive sizes from other
    config keys (head_dim from hidden_size / heads) or keep cross-head parameters; say so, not save."""
    import torch

    with torch.device("meta"):
        rebuilt = type(model)(model.config)
    # a Conv1D weight is [in, out]; leanlm holds those layers as nn.Linear ([out, in])
    shapes = {f"{mn}.{pn}" if mn else pn: p.shape[::-1] if is_conv1d(mod) and pn == "weight" else p.shape
              for mn, mod in rebuilt.named_modules() for pn, p in mod.named_parameters(recurse=False)}
    for name, param in model.named_parameters():
        want = shapes.get(name)
        if want is not None and want != param.shape:
            raise UnsupportedModelError(
                f"{what} is not supported for {type(model).__name__}: after it, {name} is {list(param.shape)} but "
                f"the model its config describes has {list(want)} (the architecture derives that size from other "
                "config keys), so the saved model would not load")


def check_token_ids(model: Any, ids: torch.Tensor, what: str) -> None:
    """Refuse token ids the model cannot embed (the mark of another model's tokenizer), which would
    otherwise fail deep in a forward pass as an index error."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    if vocab is not None and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise DataError(f"{what} holds token id {int(ids.max())} (min {int(ids.min())}) but the model's embedding "
                        f"has {vocab} rows: the tokenizer does not belong to this model; tokenize with the model's own")


def tied_embedding(model: nn.Module) -> bool:
    """Whether the input embedding and the LM head are one tensor right now."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return False
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return (isinstance(embed, nn.Embedding) and isinstance(weight, torch.Tensor)
            and embed.weight.data_ptr() == weight.data_ptr())


def share_tied_codes(model: nn.Module, stats: dict) -> dict:
    """Called after a step on a model whose embedding and head were one tensor: if the step packed the head,
    the input embedding becomes a view of the head's codes, so the model no longer keeps a float copy of
    the matrix it shares. Returns the step's stats, with what changed."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied_embedding(model) or not isinstance(embed, nn.Embedding) or not hasattr(head, "embedding_view"):
        return stats
    name = next(n for n, m in model.named_modules() if m is embed)
    dropped = embed.weight.numel() * embed.weight.element_size()
    replace_module(model, name, head.embedding_view(embed.padding_idx))
    return {**stats, "tied_embedding": f"{name} reads the packed LM head's codes; {dropped / 2**20:.1f} MiB of "
                                       "float weights dropped"}
