"""The generation loop shared by evaluation, benchmarking and serving: prefill, then one token at a time."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


def _cache_kwarg(model: nn.Module) -> str:
    return _cache_kwarg_of(type(model))


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; older releases only know the former."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def prefill(model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt through the model, filling `cache`; returns the last position's logits."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    return out.logits[:, -1, :]


@torch.inference_mode()
def decode_one_token(model: nn.Module, token: torch.Tensor, cache) -> torch.Tensor:
    """Feed one token per sequence ([batch, 1]) and return the next-token logits."""
    out = model(input_ids=token, use_cache=True, **{_cache_kwarg(model): cache})
    return out.logits[:, -1, :]


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding; returns only the new tokens, [batch, <= max_new_tokens]."""
    cache = new_cache(model)
    token = prefill(model, input_ids, cache).argmax(-1, keepdim=True)
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and bool((token == eos_token_id).all()):
            break
        token = decode_one_token(model, token, cache).argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    out = generate(model, ids, max_new_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
