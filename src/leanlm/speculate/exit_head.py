"""An early exit after block K, trained to speak like the whole model (exit-aware distillation).

A model trained without early-exit losses (SmolLM2 is one) reads nonsense through its own final norm
and LM head after block K: the top-1 agreement with the full model is under 10% before block 20 of 30.
Rather than retrain the model (LayerSkip's layer dropout and exit loss, which changes the model a team
serves), leanlm trains a small residual adapter and a copy of the final norm in front of the frozen LM
head, on the forward KL to the full model's distributions (as Kangaroo trains its adapter). The model
is untouched, so self-speculation with it stays exactly the original model's output; only how often its
drafts are accepted, and how often an early exit is confident, depend on the adapter.

Saved beside, not inside, the model: DIR/exit_head.safetensors and DIR/exit_head.json, which names the
block, the sizes and a digest of the model it was trained on, so it refuses another model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.core.paths import atomic_dir
from leanlm.errors import ConfigError
from leanlm.speculate.exit_ops import token_kl
from leanlm.speculate.split import LayerSplit

FORMAT = "leanlm-exit-head"


class ExitHead(nn.Module):
    """logits = lm_head(norm(h + adapter(h))), the adapter's output layer starting at zero (so an untrained
    head is the model's own final norm and LM head); `width` 0 means no adapter."""

    def __init__(self, norm: nn.Module, hidden: int, width: int):
        super().__init__()
        self.norm = copy.deepcopy(norm)
        self.hidden, self.width = hidden, width
        self.adapter = None
        if width:
            self.adapter = nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, hidden))
            nn.init.zeros_(self.adapter[2].weight)
            nn.init.zeros_(self.adapter[2].bias)
        self.to(next(norm.parameters()).device)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        if self.adapter is not None:
            hidden = hidden + self.adapter(hidden)
        return lm_head(self.norm(hidden))


def model_digest(split: LayerSplit) -> str:
    """A digest of the weights the exit reads through (the blocks before it, the LM head's shape)."""
    h = hashlib.sha256(repr(tuple(split.lm_head.weight.shape)).encode())
    for block in split.blocks[: split.layer]:
        for p in block.parameters():
            h.update(p.detach().float().cpu().numpy().tobytes()[:4096])  # a sample of each tensor: cheap, telling
    return h.hexdigest()[:16]


def save_exit_head(head: ExitHead, split: LayerSplit, out: str | os.PathLike, stats: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write the head to directory `out`, whole or not at all; an existing `out` needs `overwrite`."""
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in head.state_dict().items()}, tmp / "exit_head.safetensors")
        meta = {"format": FORMAT, "layer": split.layer, "blocks": split.depth, "hidden": head.hidden,
                "width": head.width, "vocab": split.lm_head.weight.shape[0], "model_digest": model_digest(split),
                "training": stats or {}}
        (tmp / "exit_head.json").write_text(json.dumps(meta, indent=2))
    return Path(out)


def load_exit_head(path: str | os.PathLike, model: nn.Module) -> tuple[ExitHead, LayerSplit]:
    """The head saved at `path` and the split it reads, refusing a head trained on another model."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / "exit_head.json"
    if not meta_file.is_file():
        raise ConfigError(f"{path} holds no exit head (no exit_head.json); train one with "
                          "`leanlm distill --exit-layer K MODEL --out DIR`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{meta_file} is not a leanlm exit head (format {meta.get('format')!r})")
    split = LayerSplit(model, int(meta["layer"]))
    if (meta["blocks"], meta["hidden"], meta["vocab"]) != (split.depth, model.config.hidden_size,
                                                           split.lm_head.weight.shape[0]) \
            or meta["model_digest"] != model_digest(split):
        raise ConfigError(f"the exit head at {path} was trained on another model (its blocks, sizes or weights "
                          "differ from this one's); train one for this model with `leanlm distill --exit-layer K`")
    head = ExitHead(split.norm, meta["hidden"], meta["width"])
    head.load_state_dict(load_file(path / "exit_head.safetensors"))
    return head.eval(), split


def _windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    n = len(ids) // seq_len
    if n < 1:
        raise ConfigError(f"the training text has {len(ids)} tokens, fewer than one {seq_len}-token window")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def _capture(split: LayerSplit) -> tuple[dict, torch.utils.hooks.RemovableHandle]:
    seen: dict = {}

    def hook(module, args, out):
        seen["hidden"] = out[0] if isinstance(out, tuple) else out
    return seen, split.blocks[split.layer - 1].register_forward_hook(hook)


def exit_logits_on(model: nn.Module, head: ExitHead, split: LayerSplit, ids: torch.Tensor):
    """(full logits, exit logits) [batch, tokens, vocab] for ids [batch, tokens], in one forward pass."""
    seen, handle = _capture(split)
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits
            return full, head(seen["hidden"], split.lm_head)
    finally:
        handle.remove()


def train_exit_head(model: nn.Module, tokenizer, text: str, layer: int, steps: int = 300, width: int | None = None,
                    seq_len: int = 512, batch_size: int = 2, lr: float = 1e-3, seed: int = 0) -> tuple[ExitHead, dict]:
    """Fit an exit head after block `layer` to the model's own distributions on `text` (forward KL)."""
    if steps < 1 or batch_size < 1 or seq_len < 2 or lr <= 0:
        raise ConfigError(f"exit head training needs steps, batch_size >= 1, seq_len >= 2 and lr > 0; got {steps}, "
                          f"{batch_size}, {seq_len}, {lr}")
    split = LayerSplit(model, layer)
    hidden = model.config.hidden_size
    head = ExitHead(split.norm, hidden, 2 * hidden if width is None else width)
    model.requires_grad_(False)
    model.eval()
    head.train()
    device = split.lm_head.weight.device
    windows = _windows(tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0], seq_len)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    seen, handle = _capture(split)
    losses = []
    try:
        bar = tqdm(range(steps), desc=f"exit head after block {layer}", unit="step")
        for _ in bar:
            ids = torch.stack(rng.sample(windows, min(batch_size, len(windows)))).to(device)
            with torch.no_grad():
                full = model(input_ids=ids).logits
            loss = token_kl(full, head(seen["hidden"].detach(), split.lm_head)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.3f}")
    finally:
        handle.remove()
    head.eval()
    tail = losses[-max(1, steps // 10):]
    return head, {"layer": layer, "steps": steps, "width": head.width, "seq_len": seq_len, "batch_size": batch_size,
                  "lr": lr, "first_kl": losses[0], "final_kl": sum(tail) / len(tail)}
