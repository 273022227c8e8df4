"""A decoder run in two parts over one KV cache: blocks [0, K) and an exit head guess the next token
cheaply; blocks [K, N) finish from the hidden state the first part left, so a token the first part
already ran is never run through the shared blocks again.

Self-speculation drafts with the first part and verifies with the second; early exit emits the first
part's guess when it is confident and runs the second part later, for several tokens in one pass.
Everything is found from the module graph (core.structure): the blocks, the final norm, the rotary
embedding beside the blocks, the LM head.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from leanlm.core.structure import find_structure
from leanlm.errors import ConfigError, UnsupportedModelError


class LayerSplit:
    """Blocks [0, layer) are the shallow part, [layer, N) the deep part; both write the same cache."""

    def __init__(self, model: nn.Module, layer: int):
        structure = find_structure(model)
        n = len(structure.blocks)
        if not isinstance(layer, int) or not 1 <= layer < n:
            raise ConfigError(f"exit layer {layer!r} is outside the model's blocks: it has {n}, so the first part can "
                              f"be 1 to {n - 1} blocks long")
        if structure.final_norm_name is None or model.get_output_embeddings() is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no final norm and LM head to read an early exit "
                                        "through")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kinds = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention"})
        if kinds:
            raise UnsupportedModelError(f"{type(model).__name__} has {', '.join(kinds)} layers; running its blocks in "
                                        "two parts builds one full causal mask for all of them, so self-speculation "
                                        "and early exit need a model whose layers all attend in full")
        base = model.get_submodule(structure.blocks_name.rpartition(".")[0])
        self.rotary = getattr(base, "rotary_emb", None)
        if self.rotary is None:
            raise UnsupportedModelError(f"{type(model).__name__}: found no rotary embedding (`rotary_emb`) beside the "
                                        "blocks, which running them in two parts needs")
        self.model, self.blocks, self.layer, self.depth = model, structure.blocks, layer, n
        self.embed = model.get_input_embeddings()
        self.norm = model.get_submodule(structure.final_norm_name)
        self._cache_kw = _cache_kwarg(type(structure.blocks[0]))

    @property
    def lm_head(self) -> nn.Module:
        """Looked up on each use: prepacking (runtime.onednn_linear) replaces the module after the split is made."""
        return self.model.get_output_embeddings()

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.embed(torch.tensor([ids], device=self.lm_head.weight.device))

    def run(self, hidden: torch.Tensor, start: int, end: int, cache) -> torch.Tensor:
        """Run hidden states [1, tokens, d] through blocks [start, end), appending them to the cache after
        what blocks start.. hold; the hidden states after block end-1."""
        from transformers.masking_utils import create_causal_mask

        past = cache.get_seq_length(start)
        positions = torch.arange(past, past + hidden.shape[1], device=hidden.device)[None]
        # sized against block `start`'s cache: the two parts hold different lengths between passes
        mask = create_causal_mask(self.model.config, hidden, None, cache, positions, layer_idx=start)
        rotary = self.rotary(hidden, position_ids=positions)
        for block in self.blocks[start:end]:
            out = block(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions,
                        use_cache=True, **{self._cache_kw: cache})
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def shallow(self, ids: list[int], cache) -> torch.Tensor:
        return self.run(self.embed_ids(ids), 0, self.layer, cache)

    def deep_logits(self, hidden: torch.Tensor, cache) -> torch.Tensor:
        """The full model's logits [tokens, vocab] for shallow hidden states [1, tokens, d]."""
        out = self.run(hidden, self.layer, self.depth, cache)
        return self.lm_head(self.norm(out))[0]


@functools.cache
def _cache_kwarg(cls: type) -> str:
    """transformers 5.x names a block's cache argument `cache`; older releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
