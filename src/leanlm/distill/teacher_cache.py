"""Teacher logits cached on disk: the teacher's top-k logits at every position of every example,
computed once and reused by later runs on the same teacher and data (a new learning rate, more steps,
another student), which then neither run the teacher nor load it.

Only the top k are kept because the full distribution does not fit: this model's 49k-entry
vocabulary in float16 is 25 MB per 256-token example; k = 64 is 0.13% of that. The loss is then
forward KL from the teacher's distribution renormalized over its top k (distill_ops.topk_forward_kl).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.core.paths import atomic_file
from leanlm.train.examples import Examples
from leanlm.train.trainer import fingerprint

log = logging.getLogger(__name__)


def source_signature(source: str | os.PathLike) -> list:
    """What identifies a saved teacher without loading it: its files' names, sizes and times."""
    from leanlm.models.load import resolve_source

    path = resolve_source(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [str(path)] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def model_signature(model: nn.Module) -> list:
    """What identifies an in-memory teacher: its config and a checksum of every parameter."""
    with torch.no_grad():
        sums = [float(p.double().sum()) for p in model.parameters()]
    return [getattr(model, "config", None) and model.config.to_dict(), sums]


def data_digest(examples: Examples) -> str:
    h = hashlib.sha256()
    for t in (examples.input_ids, examples.attention_mask):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    def __init__(self, directory: str | os.PathLike, teacher_signature: list, examples: Examples, top_k: int):
        self.top_k = top_k
        key = fingerprint(teacher_signature, data_digest(examples), top_k)
        self.path = Path(directory) / f"teacher-top{top_k}-{key}.safetensors"
        self.values: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def exists(self) -> bool:
        return self.path.is_file()

    @torch.no_grad()
    def build(self, teacher: nn.Module, examples: Examples, device, batch_size: int = 4) -> None:
        """One teacher pass over `examples` (all of them, by example_id order), written atomically."""
        from safetensors.torch import save_file

        n, seq = examples.input_ids.shape
        values = torch.empty(n, seq, self.top_k, dtype=torch.float16)
        indices = torch.empty(n, seq, self.top_k, dtype=torch.int32)
        teacher.eval()
        for i in tqdm(range(0, n, batch_size), desc="caching teacher logits", unit="batch", leave=False):
            batch = examples.take(slice(i, i + batch_size))
            logits = teacher(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).logits
            top = logits.float().topk(self.top_k, dim=-1)
            values[batch["example_id"]], indices[batch["example_id"]] = top.values.half().cpu(), top.indices.int().cpu()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            save_file({"values": values, "indices": indices}, str(tmp))
        self.values, self.indices = values, indices
        log.info("cached the teacher's top-%d logits of %d examples in %s (%.0f MB)", self.top_k, n, self.path,
                 self.path.stat().st_size / 2**20)

    def load(self) -> None:
        from safetensors.torch import load_file

        state = load_file(str(self.path))
        self.values, self.indices = state["values"], state["indices"]
        log.info("reusing cached teacher logits from %s", self.path)

    def take(self, example_id: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = example_id.cpu()
        return self.values[ids].to(device), self.indices[ids].to(device)
