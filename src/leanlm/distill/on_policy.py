"""On-policy distillation (GKD, Agarwal et al. 2024): on a share of the training batches the student
writes the continuation itself and learns the teacher's distributions on its own tokens, so it is
corrected where its own mistakes take it rather than only on the reference text.

Each example's prompt is the text before its first labelled token (a chat's turns before the
assistant's answer) or, for plain text where every token is labelled, its first half. Prompts are
left-padded so one `generate` call serves the micro-batch; the rollout's labels cover the generated
tokens up to and including the end-of-sequence token.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from leanlm.train.examples import IGNORE


def takes_rollout(share: float, seed: int, example_id: torch.Tensor) -> bool:
    """Whether this micro-batch is on-policy: a coin per batch, fixed by its first example (so resumed
    and multi-process runs toss the same coins)."""
    return share > 0 and random.Random(seed * 1_000_003 + int(example_id[0])).random() < share


def prompt_lengths(batch: dict) -> torch.Tensor:
    labelled = (batch["labels"] != IGNORE) & batch["attention_mask"].bool()
    first = labelled.float().argmax(-1)  # first labelled position
    half = batch["attention_mask"].sum(-1) // 2
    return torch.where(first > 1, first, half).clamp(min=1)


@torch.no_grad()
def rollout(student: nn.Module, batch: dict, seed: int, temperature: float = 1.0) -> dict:
    """The batch with each continuation replaced by one the student samples (left-padded prompts,
    position_ids from the mask)."""
    model = getattr(student, "module", student)  # DDP wraps the model; generate lives on the inner one
    ids, lengths = batch["input_ids"], prompt_lengths(batch)
    width, seq = int(lengths.max()), ids.shape[1]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    prompts = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros_like(prompts)
    for i, n in enumerate(lengths.tolist()):
        prompts[i, width - n:], mask[i, width - n:] = ids[i, :n], 1
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=seq - width, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad)
    model.train(was_training)
    return _label_generated(out, mask, width, model.config.eos_token_id)


def _label_generated(out: torch.Tensor, prompt_mask: torch.Tensor, width: int, eos) -> dict:
    eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=out.device)
    generated = out[:, width:]
    ended = torch.isin(generated, eos_ids).long().cumsum(-1)
    alive = (ended == 0) | ((ended == 1) & torch.isin(generated, eos_ids))  # up to and including the first EOS
    mask = torch.cat([prompt_mask, alive.long()], dim=1)
    labels = torch.cat([torch.full_like(prompt_mask, IGNORE), torch.where(alive, generated, IGNORE)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": out, "attention_mask": mask, "labels": labels, "position_ids": positions}
