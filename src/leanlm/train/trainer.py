"""The training loop every trainer (fine-tuning, distillation) shares, on HF Accelerate: the same code
runs on one CPU, one GPU, or several processes under `accelerate launch` (DDP).

Each optimizer step takes the same global batch however many processes share it: the step's example
indices come from one seeded permutation, each process takes its slice in micro-batches, and every
micro-batch's summed loss is divided by the global batch's token count (times the process count, which
DDP's gradient averaging divides back out). Held-out loss drives early stopping; checkpoints carry
the trainable weights, optimizer, scheduler and a fingerprint of the run so a resume can be refused
when the recipe changed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.core.config import Validated
from leanlm.errors import ConfigError
from leanlm.train.examples import IGNORE, Examples

log = logging.getLogger(__name__)
LossFn = Callable[[nn.Module, dict], torch.Tensor]  # summed loss over the batch's counted tokens


@dataclass
class TrainConfig(Validated):
    steps: int = 100
    max_minutes: float | None = None
    batch_size: int = 8
    micro_batch_size: int = 4
    seq_len: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 25
    patience: int = 3
    validation_fraction: float = 0.05
    checkpoint_every: int = 25
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0

    def validate(self) -> None:
        if min(self.steps, self.batch_size, self.micro_batch_size, self.eval_every, self.checkpoint_every) < 1:
            raise ConfigError("steps, batch_size, micro_batch_size, eval_every and checkpoint_every must be >= 1")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.lr <= 0 or not 0 < self.validation_fraction < 0.5:
            raise ConfigError("lr must be > 0 and validation_fraction in (0, 0.5)")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be positive, got {self.max_minutes}")


def counted(batch: dict) -> int:
    """Tokens that take a loss: positions 1.. whose label is not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def accelerator_for(config: TrainConfig):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())


def fingerprint(*parts) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, model: nn.Module, loss_fn: LossFn, train: Examples, validation: Examples, config: TrainConfig,
                 work_dir: Path | None = None, run_id: str = "", desc: str = "training", accelerator=None):
        self.config, self.loss_fn, self.train, self.validation = config, loss_fn, train, validation
        self.work_dir, self.run_id, self.desc = work_dir, run_id, desc
        self.acc = accelerator or accelerator_for(config)
        world = self.acc.num_processes
        if config.batch_size % (config.micro_batch_size * world):
            raise ConfigError(f"batch_size {config.batch_size} must be a multiple of micro_batch_size "
                              f"{config.micro_batch_size} x {world} processes")
        if len(train) < config.batch_size:
            raise ConfigError(f"{len(train)} training examples, fewer than one batch of {config.batch_size}")
        if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.order = self._order()
        self.step, self.best, self.best_state, self.history = 0, math.inf, None, []

    def _lr_factor(self, step: int) -> float:
        warm = self.config.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.config.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _order(self) -> torch.Tensor:
        """Example indices for every step: seeded permutations, concatenated as the epochs need."""
        gen = torch.Generator().manual_seed(self.config.seed)
        need = self.config.steps * self.config.batch_size
        perms = [torch.randperm(len(self.train), generator=gen) for _ in range(-(-need // len(self.train)))]
        return torch.cat(perms)[:need]

    def _micro_batches(self, step: int) -> tuple[list[dict], int]:
        """This process's micro-batches of the step, and the global batch's counted tokens."""
        cfg, world, rank = self.config, self.acc.num_processes, self.acc.process_index
        idx = self.order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        share = cfg.batch_size // world
        mine = idx[rank * share : (rank + 1) * share]
        return [self.train.take(mine[i : i + cfg.micro_batch_size]) for i in range(0, share, cfg.micro_batch_size)], \
            counted(self.train.take(idx))

    def train_step(self, step: int) -> float:
        micro, tokens = self._micro_batches(step)
        self.model.train()
        total = 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            with contextlib.nullcontext() if sync else self.acc.no_sync(self.model):
                batch = {k: v.to(self.acc.device) for k, v in batch.items()}
                with self.acc.autocast():
                    loss = self.loss_fn(self.model, batch)
                self.acc.backward(loss * self.acc.num_processes / max(tokens, 1))
                total += loss.item()
        if self.config.max_grad_norm:
            self.acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.acc.reduce(torch.tensor(total, device=self.acc.device), "sum").item() / max(tokens, 1)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss per counted token, the validation set shared out over the processes."""
        self.model.eval()
        world, rank, mb = self.acc.num_processes, self.acc.process_index, self.config.micro_batch_size
        mine = torch.arange(len(self.validation))[rank::world]
        loss_sum, tokens = 0.0, 0
        for i in range(0, len(mine), mb):
            batch = {k: v.to(self.acc.device) for k, v in self.validation.take(mine[i : i + mb]).items()}
            with self.acc.autocast():
                loss_sum += self.loss_fn(self.model, batch).item()
            tokens += counted(batch)
        both = self.acc.reduce(torch.tensor([loss_sum, float(tokens)], device=self.acc.device), "sum")
        return (both[0] / both[1].clamp(min=1)).item()

    def run(self, resume: bool = False) -> dict:
        cfg = self.config
        if resume:
            self._load_checkpoint()
        start, t0 = self.step, time.perf_counter()
        stale, stopped = 0, "steps"
        bar = tqdm(total=cfg.steps, initial=start, desc=self.desc, unit="step", disable=not self.acc.is_main_process)
        if start == 0:
            self.best = self.evaluate()
            self.history.append({"step": 0, "validation_loss": self.best})
            self.best_state = self._trainable_state()
        while self.step < cfg.steps:
            loss = self.train_step(self.step)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", best_val=f"{self.best:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            judged = self.step % cfg.eval_every == 0 or self.step == cfg.steps
            if judged:
                stale = 0 if self._judge(loss) else stale + 1
                if cfg.patience and stale >= cfg.patience:
                    stopped = "early stopping"
                    break
            if self.work_dir is not None and self.step % cfg.checkpoint_every == 0:
                self._save_checkpoint()
            if self._out_of_time(t0):
                stopped = "max_minutes"
                if not judged:  # else the steps since the last evaluation could never become the best
                    self._judge(loss)
                break
        bar.close()
        self._restore(self.best_state)
        seconds = time.perf_counter() - t0
        trained = self.step - start
        return {"steps": self.step, "stopped_by": stopped, "best_validation_loss": self.best, "seconds": seconds,
                "tokens_per_second": trained * cfg.batch_size * cfg.seq_len / max(seconds, 1e-9),
                "processes": self.acc.num_processes, "history": self.history}

    def _judge(self, loss: float) -> bool:
        """Evaluate on the held-out set, record it, and keep the weights if they are the best so far."""
        val = self.evaluate()
        self.history.append({"step": self.step, "train_loss": loss, "validation_loss": val})
        if val < self.best:
            self.best, self.best_state = val, self._trainable_state()
            return True
        return False

    def _out_of_time(self, t0: float) -> bool:
        if self.config.max_minutes is None:
            return False
        late = float(time.perf_counter() - t0 > 60 * self.config.max_minutes)
        return self.acc.reduce(torch.tensor(late, device=self.acc.device), "max").item() > 0

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.acc.unwrap_model(self.model)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _restore(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            return
        params = dict(self.acc.unwrap_model(self.model).named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def _checkpoint_path(self) -> Path:
        return Path(self.work_dir) / "checkpoint.pt"

    def _save_checkpoint(self) -> None:
        if not self.acc.is_main_process:
            self.acc.wait_for_everyone()
            return
        path = self._checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"run_id": self.run_id, "step": self.step, "weights": self._trainable_state(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "best": self.best, "best_state": self.best_state, "history": self.history}, tmp)
        os.replace(tmp, path)
        self.acc.wait_for_everyone()

    def _load_checkpoint(self) -> None:
        path = self._checkpoint_path() if self.work_dir is not None else None
        if path is None or not path.is_file():
            log.info("no checkpoint to resume from%s; starting fresh", f" at {path}" if path else "")
            return
        state = torch.load(path, map_location=self.acc.device, weights_only=False)
        if state["run_id"] != self.run_id:
            raise ConfigError(f"{path} was made by a different recipe, model or data (fingerprint {state['run_id']}, "
                              f"this run {self.run_id}); refusing to resume from it. Remove it or run without resume")
        self._restore(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.best_state, self.history = (state["step"], state["best"], state["best_state"],
                                                               state["history"])
        log.info("resumed from %s at step %d", path, self.step)
