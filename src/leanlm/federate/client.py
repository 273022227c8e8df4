"""A client's side of a round, without Flower: the base model with LoRA adapters (loaded once per process),
the global adapter put in, local steps of AdamW on the client's text (FedProx: plus a pull towards the
global adapter), and the client's held-out loss."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from leanlm.finetune.finetune import causal_lm_loss
from leanlm.finetune.lora import add_lora, lora_targets
from leanlm.finetune.qlora import add_qlora
from leanlm.models.load import load_model
from leanlm.train.examples import text_examples

_MODELS: dict = {}    # (base path, rank, alpha, targets, seed) -> Adapted: one base per worker process
_EXAMPLES: dict = {}  # (text digest, seq_len) -> Examples


class Adapted:
    def __init__(self, base: str, rank: int, alpha: float, targets: list[str], seed: int, freeze_a: bool = False):
        loaded = load_model(base, "cpu")
        self.tokenizer, self.fingerprint = loaded.tokenizer, base_fingerprint(loaded.model)
        names, quantized = lora_targets(loaded.model, targets)
        add = add_qlora if quantized else add_lora
        self.model = add(loaded.model, names, rank, alpha, 0.0, seed)
        if freeze_a:  # FFA-LoRA: every client holds the same seeded A, which must then match everywhere
            frozen = [(n, p) for n, p in self.model.named_parameters() if "lora_A" in n]
            h = hashlib.sha256()
            for n, p in frozen:
                p.requires_grad_(False)
                h.update(p.detach().float().numpy().tobytes())
            self.fingerprint += "-A" + h.hexdigest()[:8]
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def state(self) -> dict[str, np.ndarray]:
        return {n: p.detach().float().numpy().copy() for n, p in self.params.items()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(torch.from_numpy(arrays[n]))


def adapted(base: str, settings: dict) -> Adapted:
    """The base with the run's LoRA (rank, alpha, targets, seed, freeze_a from `settings`), once per process."""
    s = settings
    key = (base, s["rank"], s["alpha"], tuple(s["targets"]), s["seed"], s.get("freeze_a", False))
    if key not in _MODELS:
        _MODELS.clear()  # one base at a time in a worker
        _MODELS[key] = Adapted(base, *key[1:4], s["seed"], s.get("freeze_a", False))
    return _MODELS[key]


def base_fingerprint(model: torch.nn.Module) -> str:
    """Names, shapes and a sample of every tensor: clients whose bases differ would average nonsense."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().flatten()[:64].float().numpy().tobytes())
    return h.hexdigest()[:16]


def examples(tokenizer, text: str, seq_len: int):
    key = (hashlib.sha256(text.encode()).hexdigest(), seq_len)
    if key not in _EXAMPLES:
        if len(_EXAMPLES) > 16:
            _EXAMPLES.clear()
        _EXAMPLES[key] = text_examples(tokenizer, text, seq_len)
    return _EXAMPLES[key]


def pooled_holdout(tokenizer, clients: list[dict], seq_len: int, windows: int):
    """Every client's held-out text, pooled; `windows` of them spread evenly across it (0: all)."""
    held = examples(tokenizer, "\n\n".join(c["holdout"] for c in clients), seq_len)
    if not windows or windows >= len(held):
        return held
    from leanlm.train.examples import Examples

    pick = torch.linspace(0, len(held) - 1, windows).round().long()
    return Examples(**{k: v[pick] for k, v in vars(held).items()})


def local_train(a: Adapted, train, steps: int, batch_size: int, lr: float, mu: float, seed: int) -> float:
    """`steps` AdamW steps on random batches of `train`; the mean training loss per token."""
    a.model.train()
    anchor = {n: p.detach().clone() for n, p in a.params.items()} if mu > 0 else None
    opt = torch.optim.AdamW(list(a.params.values()), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = train.take(torch.randint(0, len(train), (min(batch_size, len(train)),), generator=gen))
        tokens = max(1, int(batch["attention_mask"][:, 1:].sum()))
        loss = causal_lm_loss(a.model, batch) / tokens
        losses.append(float(loss.detach()))
        if anchor is not None:  # FedProx: stay near the round's global adapter
            loss = loss + mu / 2 * sum(((p - anchor[n]) ** 2).sum() for n, p in a.params.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    a.model.eval()
    return float(np.mean(losses))


@torch.no_grad()
def mean_loss(a: Adapted, held, batch_size: int = 8) -> tuple[float, int]:
    """(mean next-token loss per token, tokens) over every window of `held`."""
    total, tokens = 0.0, 0
    for i in range(0, len(held), batch_size):
        batch = held.take(slice(i, i + batch_size))
        total += float(causal_lm_loss(a.model, batch))
        tokens += int(batch["attention_mask"][:, 1:].sum())
    return total / max(1, tokens), tokens
