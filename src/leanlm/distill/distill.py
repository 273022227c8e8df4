"""Distillation: a student (a pruned or quantized copy of the teacher, or any smaller model sharing its
tokenizer) learns the teacher's next-token distributions on the team's text: forward KL, reverse KL
or generalized JSD with temperature, optionally plus final-hidden-state matching (same width) and the
plain LM loss. The teacher runs on the fly under no_grad, beside the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from leanlm.core.structure import matches
from leanlm.core.train_data import IGNORE
from leanlm.core.trainer import TrainConfig, Trainer, fingerprint
from leanlm.distill.distill_ops import forward_kl, generalized_jsd, hidden_mse, reverse_kl
from leanlm.errors import ConfigError
from leanlm.finetune.finetune import FinetuneConfig, training_examples
from leanlm.pipeline.config import to_dict
from leanlm.pipeline.steps import StepConfig, StepContext, register_step


@dataclass
class DistillConfig(StepConfig):
    """`teacher`: a model name/path; default: the model the recipe started from."""
    teacher: str | None = None
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    hidden_weight: float = 0.0
    lm_weight: float = 0.0
    trainable: list[str] = field(default_factory=lambda: ["*"])
    data: str | None = None
    resume: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5))

    def validate(self) -> None:
        if not 0 <= self.beta <= 1 or self.temperature <= 0:
            raise ConfigError(f"need beta in [0, 1] and temperature > 0, got {self.beta}, {self.temperature}")
        if self.hidden_weight < 0 or self.lm_weight < 0:
            raise ConfigError("hidden_weight and lm_weight must be >= 0")
        self.train.validate()


def check_tokenizers(student_tok: Any, teacher_tok: Any) -> None:
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        differ = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise ConfigError(f"teacher and student tokenizers differ ({len(s)} vs {len(t)} tokens; e.g. {differ}); "
                          "distillation compares distributions token by token, so they must share one")


def distill_loss(teacher: nn.Module, config: DistillConfig):
    kinds = {"forward_kl": forward_kl, "reverse_kl": reverse_kl,
             "jsd": lambda s, t, temperature: generalized_jsd(s, t, config.beta, temperature)}
    divergence = kinds[config.loss]
    want_hidden = config.hidden_weight > 0

    def loss(student: nn.Module, batch: dict) -> torch.Tensor:
        keep = batch["labels"][:, 1:] != IGNORE
        with torch.no_grad():
            t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=want_hidden)
        s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=want_hidden)
        s_logits, t_logits = s_out.logits[:, :-1][keep], t_out.logits[:, :-1][keep]
        total = divergence(s_logits, t_logits, temperature=config.temperature)
        if want_hidden:
            total = total + config.hidden_weight * hidden_mse(s_out.hidden_states[-1][:, :-1][keep],
                                                              t_out.hidden_states[-1][:, :-1][keep])
        if config.lm_weight:
            total = total + config.lm_weight * torch.nn.functional.cross_entropy(
                s_logits.float(), batch["labels"][:, 1:][keep], reduction="sum")
        return total
    return loss


def distill_(student: nn.Module, tokenizer: Any, teacher: nn.Module, teacher_tokenizer: Any, config: DistillConfig,
             text: str | None = None, work_dir: Path | None = None, accelerator=None, resume: bool = False) -> dict:
    check_tokenizers(tokenizer, teacher_tokenizer)
    if config.hidden_weight and student.config.hidden_size != teacher.config.hidden_size:
        raise ConfigError(f"hidden-state matching needs the same width; student {student.config.hidden_size}, "
                          f"teacher {teacher.config.hidden_size} (set hidden_weight: 0)")
    as_finetune = FinetuneConfig(data=config.data, train=config.train)
    train, validation = training_examples(tokenizer, as_finetune, text).split(config.train.validation_fraction)
    names = [n for n, p in student.named_parameters() if matches(n, config.trainable)]
    if not names:
        raise ConfigError(f"trainable patterns {config.trainable} match no parameter of the student")
    for n, p in student.named_parameters():
        p.requires_grad_(n in names)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    run_id = fingerprint(to_dict(config), student.config.to_dict(), len(train), train.input_ids[:2].tolist())
    trainer = Trainer(student, distill_loss(teacher, config), train, validation, config.train, work_dir, run_id,
                      desc=f"distilling ({config.loss})", accelerator=accelerator)
    teacher.to(trainer.acc.device)
    stats = trainer.run(resume or config.resume)
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    stats.update(trainable_params=sum(p.numel() for n, p in student.named_parameters() if n in names),
                 loss=config.loss, examples=len(train))
    return stats


@register_step("distill", DistillConfig)
def _distill_step(model: nn.Module, config: DistillConfig, ctx: StepContext) -> dict:
    from leanlm.core.models import load_model

    source = config.teacher or ctx.source
    if source is None:
        raise ConfigError("distill needs a teacher: set 'teacher' or run it inside `leanlm optimize`")
    teacher = load_model(source, device=str(ctx.device))
    stats = distill_(model, ctx.tokenizer, teacher.model, teacher.tokenizer, config, ctx.train_text,
                     ctx.work_dir, resume=ctx.resume)
    stats["teacher"] = str(source)
    return stats
