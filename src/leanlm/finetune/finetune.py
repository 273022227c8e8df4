"""Fine-tuning on the team's data: full or LoRA (PEFT), on plain domain text (loss on every token) or
chat JSONL (loss on the assistant's tokens), with held-out early stopping and resumable checkpoints
(core.trainer). In a recipe the LoRA is merged into the weights, so later steps (quantization,
export) see an ordinary model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.core.config import to_dict
from leanlm.core.packed import is_runtime_module
from leanlm.core.search import Choice
from leanlm.core.step import StepConfig, StepContext, register_step
from leanlm.core.structure import check_arguments
from leanlm.data.corpus import data_files
from leanlm.errors import ConfigError
from leanlm.finetune.lora import (
    add_lora,
    lora_targets,
    refuse_opaque_targets,
    trainable_counts,
)
from leanlm.finetune.qlora import add_qlora, merge_qlora
from leanlm.train.examples import (
    IGNORE,
    training_examples,
)
from leanlm.train.trainer import TrainConfig, Trainer, fingerprint

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(StepConfig):
    """`data`: a text/JSONL file or directory (a JSONL of `messages` trains on assistant turns);
    default: the run's training split."""
    stage = "heal"
    search = {"rank": Choice(8, 16, 32), "train.max_minutes": Choice(2.0, 5.0, 10.0)}
    needs_calibration = True  # built lazily: only a LoRA merged into a quantized base (GPTQ requantize) uses it
    search_cost = 3
    method: Literal["lora", "full"] = "lora"
    data: str | None = None
    too_long: Literal["truncate", "refuse"] = "truncate"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["*"])
    merge: bool = True
    # how a LoRA on a quantized base is folded back: GPTQ on calibration data keeps the update's effect;
    # rtn re-rounds (fast, no data, loses most of an update smaller than half a quantization step)
    requantize: Literal["gptq", "rtn"] = "gptq"
    resume: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4))

    def validate(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1)")

    def check(self, model: nn.Module | None) -> None:
        if self.data is not None:
            data_files(self.data)

    def check_opaque(self, opaque: dict[str, str]) -> None:
        if self.method == "lora":
            refuse_opaque_targets(opaque, self.targets)


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def finetune_(model: nn.Module, tokenizer: Any, config: FinetuneConfig, text: str | None = None,
              work_dir: Path | None = None, accelerator=None, source: str = "", resume: bool = False,
              calibration: Callable[[], torch.Tensor] | None = None, device=None) -> tuple[nn.Module, dict]:
    """Train `model` as `config` says; returns the model to use next (merged, or the LoRA wrapper when
    merge is off) and the training stats. On a leanlm-quantized model the LoRA trains over the packed
    layers (QLoRA) and merging requantizes them; `calibration` supplies GPTQ's data for that."""
    check_arguments("finetune_", model, config, FinetuneConfig)
    quantized = _check_quantized_base(model, config)
    train, validation = training_examples(tokenizer, config.data, config.train.seq_len, text, config.too_long).split(config.train.validation_fraction)
    run_id = fingerprint(to_dict(config), source, len(train), train.input_ids[:2].tolist())
    if config.method == "lora":
        targets, quantized = lora_targets(model, config.targets)
        add = add_qlora if quantized else add_lora
        model = add(model, targets, config.rank, config.alpha, config.dropout, config.train.seed)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    counts = trainable_counts(model)
    trainer = Trainer(model, causal_lm_loss, train, validation, config.train, work_dir, run_id,
                      desc=f"fine-tuning ({config.method})", accelerator=accelerator)
    stats = trainer.run(resume or config.resume)
    model = trainer.acc.unwrap_model(trainer.model)
    if config.method == "lora" and config.merge and quantized:
        data = calibration() if calibration is not None and config.requantize == "gptq" else None
        stats.update({f"merge_{k}": v for k, v in merge_qlora(model, config.requantize, data, device).items()})
        # what the served (requantized) model keeps of the adapter's held-out gain; the unwrapped model,
        # since a DDP wrapper still holds the replaced layers' parameters
        trainer.model = model
        stats["validation_perplexity_after_merge"] = _ppl(trainer.evaluate())
    elif config.method == "lora" and config.merge:
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    stats.update(counts, method=config.method, examples=len(train), validation_examples=len(validation),
                 validation_perplexity_before=_ppl(stats["history"][0]["validation_loss"]),
                 validation_perplexity_after=_ppl(stats["best_validation_loss"]))
    return model, stats


def _check_quantized_base(model: nn.Module, config: FinetuneConfig) -> bool:
    quantized = any(is_runtime_module(m) for m in model.modules())
    if quantized and config.method == "full":
        raise ConfigError("full fine-tuning cannot update packed quantized weights; use method: lora (QLoRA: "
                          "adapters over the quantized layers, requantized on merge) or fine-tune before quantizing")
    return quantized


def _ppl(loss: float) -> float:
    return float(torch.tensor(loss).exp())


def _finetune_step(model: nn.Module, config: FinetuneConfig, ctx: StepContext) -> dict:
    if not config.merge:
        raise ConfigError("in a recipe the LoRA must be merged (merge: true) so later steps see plain weights; "
                          "`leanlm finetune --no-merge` saves an unmerged adapter")
    tuned, stats = finetune_(model, ctx.tokenizer, config, ctx.train_text, ctx.work_dir, source=str(ctx.source),
                             resume=ctx.resume, calibration=ctx.calibration_data, device=ctx.device)
    if tuned is not model:
        raise ConfigError("internal: the merged model is not the one the recipe holds")
    return stats


register_step("finetune", FinetuneConfig, handler=_finetune_step)
