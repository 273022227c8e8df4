"""Distillation: a student (a pruned or quantized copy of the teacher, or any smaller model sharing its
tokenizer) learns the teacher's next-token distributions on the team's text: forward KL, reverse KL
or generalized JSD with temperature, optionally plus final-hidden-state matching (same width) and the
plain LM loss. The teacher runs on the fly under no_grad, beside the student, or its top-k logits
are cached on disk once and reused (teacher_cache.py). `on_policy` > 0 trains that share of the
batches on continuations the student samples itself (GKD; on_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from leanlm.core.config import to_dict
from leanlm.core.search import Choice
from leanlm.core.step import StepConfig, StepContext, register_step
from leanlm.core.structure import check_arguments, matches
from leanlm.data.corpus import data_files
from leanlm.distill.distill_ops import (
    forward_kl,
    generalized_jsd,
    hidden_mse,
    reverse_kl,
    topk_forward_kl,
)
from leanlm.distill.on_policy import rollout, takes_rollout
from leanlm.distill.teacher_cache import TeacherCache, model_signature, source_signature
from leanlm.errors import ConfigError
from leanlm.models.load import resolve_source
from leanlm.train.examples import IGNORE, training_examples
from leanlm.train.trainer import TrainConfig, Trainer, fingerprint


@dataclass
class DistillConfig(StepConfig):
    """`teacher`: a model name/path; default: the model the recipe started from."""
    stage = "heal"
    search = {"loss": Choice("forward_kl", "jsd"), "train.max_minutes": Choice(2.0, 5.0, 10.0, 20.0)}
    search_cost = 3
    teacher: str | None = None
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    hidden_weight: float = 0.0
    lm_weight: float = 0.0
    on_policy: float = 0.0  # share of training batches on the student's own samples (GKD's lambda)
    teacher_cache: str | None = None  # directory for the teacher's cached top-k logits (forward_kl only)
    cache_top_k: int = 64
    trainable: list[str] = field(default_factory=lambda: ["*"])
    data: str | None = None
    resume: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5))

    def validate(self) -> None:
        if not 0 <= self.beta <= 1 or self.temperature <= 0:
            raise ConfigError(f"need beta in [0, 1] and temperature > 0, got {self.beta}, {self.temperature}")
        if self.hidden_weight < 0 or self.lm_weight < 0:
            raise ConfigError("hidden_weight and lm_weight must be >= 0")
        if not 0 <= self.on_policy <= 1:
            raise ConfigError(f"on_policy is a share of batches in [0, 1], got {self.on_policy}")
        if self.teacher_cache is not None:
            self._check_cacheable()

    reshapes_model = False  # trains the weights in place

    def check(self, model: nn.Module | None) -> None:
        if self.teacher is not None:
            resolve_source(self.teacher)
        if self.data is not None:
            data_files(self.data)


    def _check_cacheable(self) -> None:
        why = ("loss is not forward_kl (reverse KL and JSD need the teacher's whole distribution)"
               if self.loss != "forward_kl" else "hidden_weight > 0 (hidden states are not cached)"
               if self.hidden_weight else "on_policy > 0 (the student's samples are new text every time)"
               if self.on_policy else "")
        if why:
            raise ConfigError(f"teacher_cache cannot be used when {why}; drop teacher_cache or change that setting")
        if self.cache_top_k < 1:
            raise ConfigError(f"cache_top_k must be >= 1, got {self.cache_top_k}")


def check_tokenizers(student_tok: Any, teacher_tok: Any) -> None:
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        differ = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise ConfigError(f"teacher and student tokenizers differ ({len(s)} vs {len(t)} tokens; e.g. {differ}); "
                          "distillation compares distributions token by token, so they must share one")


def distill_loss(teacher: nn.Module | None, config: DistillConfig, cache: TeacherCache | None = None):
    kinds = {"forward_kl": forward_kl, "reverse_kl": reverse_kl,
             "jsd": lambda s, t, temperature: generalized_jsd(s, t, config.beta, temperature)}
    divergence = kinds[config.loss]
    want_hidden = config.hidden_weight > 0

    def loss(student: nn.Module, batch: dict) -> torch.Tensor:
        if student.training and takes_rollout(config.on_policy, config.train.seed, batch["example_id"]):
            batch = rollout(student, batch, seed=config.train.seed + int(batch["example_id"][0]))
        keep = batch["labels"][:, 1:] != IGNORE
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        s_out = student(**inputs, output_hidden_states=want_hidden)
        s_logits = s_out.logits[:, :-1][keep]
        if cache is not None:
            values, indices = cache.take(batch["example_id"], s_logits.device)
            total = topk_forward_kl(s_logits, values[:, :-1][keep], indices[:, :-1][keep], config.temperature)
        else:
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=want_hidden)
            total = divergence(s_logits, t_out.logits[:, :-1][keep], temperature=config.temperature)
        if want_hidden:
            total = total + config.hidden_weight * hidden_mse(s_out.hidden_states[-1][:, :-1][keep],
                                                              t_out.hidden_states[-1][:, :-1][keep])
        if config.lm_weight:
            total = total + config.lm_weight * torch.nn.functional.cross_entropy(
                s_logits.float(), batch["labels"][:, 1:][keep], reduction="sum")
        return total
    return loss


@dataclass
class Teacher:
    """The teacher: a model in memory, or a source loaded on first use (a teacher-cache hit never loads it)."""
    model: nn.Module | None = None
    tokenizer: Any = None
    source: str | None = None
    device: str = "cpu"

    def load(self) -> nn.Module:
        if self.model is None:
            from leanlm.models.load import load_model

            loaded = load_model(self.source, device=self.device)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
        return self.model

    def signature(self) -> list:
        return source_signature(self.source) if self.source is not None else model_signature(self.model)


def distill_(student: nn.Module, tokenizer: Any, teacher: Teacher | nn.Module, teacher_tokenizer: Any = None,
             config: DistillConfig | None = None, text: str | None = None, work_dir: Path | None = None,
             accelerator=None, resume: bool = False) -> dict:
    """Train `student` toward `teacher` as `config` says, in place; returns the training stats."""
    config = config or DistillConfig()
    check_arguments("distill_", student, config, DistillConfig)
    if isinstance(teacher, nn.Module):
        teacher = Teacher(teacher, teacher_tokenizer)
    if not isinstance(teacher, Teacher):
        raise ConfigError(f"distill_: the teacher must be an nn.Module or a Teacher, got {type(teacher).__name__}")
    examples = training_examples(tokenizer, config.data, config.train.seq_len, text)
    cache = _teacher_cache(teacher, config, examples)
    if cache is None or not cache.exists():
        _check_teacher(student, tokenizer, teacher.load(), teacher.tokenizer, config)
    train, validation = examples.split(config.train.validation_fraction)
    names = [n for n, p in student.named_parameters() if matches(n, config.trainable)]
    if not names:
        raise ConfigError(f"trainable patterns {config.trainable} match no parameter of the student")
    for n, p in student.named_parameters():
        p.requires_grad_(n in names)
    run_id = fingerprint(to_dict(config), student.config.to_dict(), len(train), train.input_ids[:2].tolist())
    trainer = Trainer(student, distill_loss(None if cache else teacher.model, config, cache), train, validation,
                      config.train, work_dir, run_id, desc=f"distilling ({config.loss})", accelerator=accelerator)
    if cache is not None and cache.exists():
        cache.load()
    elif cache is not None:
        cache.build(teacher.model.to(trainer.acc.device), examples, trainer.acc.device)
    else:
        teacher.model.to(trainer.acc.device)
    stats = trainer.run(resume or config.resume)
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    stats.update(trainable_params=sum(p.numel() for n, p in student.named_parameters() if n in names),
                 loss=config.loss, examples=len(train), on_policy=config.on_policy,
                 teacher_cache=None if cache is None else str(cache.path))
    return stats


def _teacher_cache(teacher: Teacher, config: DistillConfig, examples) -> TeacherCache | None:
    if config.teacher_cache is None:
        return None
    return TeacherCache(config.teacher_cache, teacher.signature(), examples, config.cache_top_k)


def _check_teacher(student: nn.Module, tokenizer: Any, teacher: nn.Module, teacher_tokenizer: Any,
                   config: DistillConfig) -> None:
    check_tokenizers(tokenizer, teacher_tokenizer)
    if config.hidden_weight and student.config.hidden_size != teacher.config.hidden_size:
        raise ConfigError(f"hidden-state matching needs the same width; student {student.config.hidden_size}, "
                          f"teacher {teacher.config.hidden_size} (set hidden_weight: 0)")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def _distill_step(model: nn.Module, config: DistillConfig, ctx: StepContext) -> dict:
    source = config.teacher or ctx.source
    if source is None:
        raise ConfigError("distill needs a teacher: set 'teacher' or run it inside `leanlm optimize`")
    teacher = Teacher(source=str(source), device=str(ctx.device))
    stats = distill_(model, ctx.tokenizer, teacher, config=config, text=ctx.train_text, work_dir=ctx.work_dir,
                     resume=ctx.resume)
    stats["teacher"] = str(source)
    return stats


register_step("distill", DistillConfig, handler=_distill_step)
