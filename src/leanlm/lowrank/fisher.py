"""How much the loss cares about each output channel of each targeted linear: the mean squared gradient of
the next-token loss with respect to the layer's output (the diagonal empirical Fisher), from one backward
pass over the calibration data. It turns a layer's output error into an estimate of the loss it costs, so
errors in different layers can be compared and the parameter budget spent where the loss barely moves."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def output_fisher(model: nn.Module, layers: dict[str, nn.Module], calibration: torch.Tensor,
                  batch_size: int = 4) -> dict[str, torch.Tensor]:
    """name -> [out_features] mean squared loss gradient per output channel, per token."""
    sums = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in layers.items()}
    tokens = [0]

    def hook(name):
        def accumulate(grad):  # returns None: the gradient itself flows on unchanged
            sums[name].add_(grad.detach().double().pow(2).sum(dim=(0, 1)).cpu())

        def forward_hook(module, args, output):
            if output.requires_grad:
                output.register_hook(accumulate)
        return forward_hook

    embed = model.get_input_embeddings()
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    # gradients flow from the embeddings' output only: the weights need none, which saves their memory
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    wanted = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    try:
        model.requires_grad_(False)
        for start in tqdm(range(0, calibration.shape[0], batch_size), desc="low-rank: loss sensitivity",
                          unit="batch", leave=False):
            ids = calibration[start:start + batch_size].to(device)
            with torch.enable_grad():
                out = model(input_ids=ids, labels=ids, use_cache=False)
                # the loss is a mean over tokens; times the token count, each token's gradient is its own
                (out.loss * (ids.shape[0] * (ids.shape[1] - 1))).backward()
            tokens[0] += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        for h in handles:
            h.remove()
        for p, flag in wanted.items():
            p.requires_grad_(flag)
    return {name: s / max(1, tokens[0]) for name, s in sums.items()}
