"""Distillation modes: the teacher's top-k logits cached on disk and reused, and on-policy (GKD)
batches on the student's own samples."""

import copy

import pytest
import torch

from leanlm.distill import DistillConfig, Teacher, distill_, distill_ops
from leanlm.distill.on_policy import (
    _label_generated,
    prompt_lengths,
    rollout,
    takes_rollout,
)
from leanlm.errors import ConfigError
from leanlm.models.load import load_model
from leanlm.pipeline.recipe import parse_recipe
from leanlm.train.examples import IGNORE
from tests.test_train import TEXT, small_train


def test_topk_forward_kl_is_forward_kl_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 40, generator=g), torch.randn(7, 40, generator=g)
    full = t.topk(40, dim=-1)
    torch.testing.assert_close(distill_ops.topk_forward_kl(s, full.values, full.indices, 2.0),
                               distill_ops.forward_kl(s, t, 2.0))
    top = t.topk(5, dim=-1)
    assert distill_ops.topk_forward_kl(s, top.values, top.indices) > 0
    assert distill_ops.topk_forward_kl(t, top.values, top.indices) < distill_ops.topk_forward_kl(s, top.values, top.indices)


def test_teacher_cache_is_built_once_and_reused_without_loading_the_teacher(tiny_dir, tmp_path):
    config = DistillConfig(teacher_cache=str(tmp_path / "cache"), cache_top_k=16, train=small_train(lr=1e-3))
    first, second = (load_model(tiny_dir, device="cpu").model for _ in range(2))
    for student in (first, second):  # a student that differs from the teacher
        with torch.no_grad():
            student.model.layers[1].mlp.down_proj.weight.zero_()
    built = Teacher(source=str(tiny_dir))
    stats_a = distill_(first, load_model(tiny_dir, "cpu").tokenizer, built, config=copy.deepcopy(config), text=TEXT)
    assert built.model is not None and len(list((tmp_path / "cache").glob("teacher-top16-*.safetensors"))) == 1
    reused = Teacher(source=str(tiny_dir))
    stats_b = distill_(second, load_model(tiny_dir, "cpu").tokenizer, reused, config=copy.deepcopy(config), text=TEXT)
    assert reused.model is None  # the cache served every batch
    assert stats_b["best_validation_loss"] < stats_b["history"][0]["validation_loss"]
    assert [h["validation_loss"] for h in stats_a["history"]] == pytest.approx(
        [h["validation_loss"] for h in stats_b["history"]], rel=1e-5)
    other = DistillConfig(teacher_cache=str(tmp_path / "cache"), cache_top_k=16, train=small_train(seq_len=32))
    distill_(second, load_model(tiny_dir, "cpu").tokenizer, Teacher(source=str(tiny_dir)), config=other, text=TEXT)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # other data, other cache


def test_rollout_labels_only_the_generated_tokens(tiny):
    ids = torch.randint(1, 200, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "example_id": torch.tensor([3, 4])}
    assert prompt_lengths(batch).tolist() == [8, 8]  # plain text: the first half is the prompt
    chat_labels = torch.full_like(ids, IGNORE)
    chat_labels[0, 5:], chat_labels[1, 11:] = ids[0, 5:], ids[1, 11:]
    assert prompt_lengths({**batch, "labels": chat_labels}).tolist() == [5, 11]
    out = rollout(tiny.model, {**batch, "labels": chat_labels}, seed=0)
    assert out["input_ids"].shape[1] <= 16 and (out["input_ids"][0, 6:11] == ids[0, :5]).all()  # left-padded
    assert (out["labels"][:, :11] == IGNORE).all() and out["attention_mask"][0, :6].sum() == 0
    torch.testing.assert_close(out["position_ids"][0, 6:11], torch.arange(5))
    assert takes_rollout(1.0, 0, batch["example_id"]) and not takes_rollout(0.0, 0, batch["example_id"])


def test_generated_text_is_labelled_up_to_the_first_end_of_sequence():
    out = torch.tensor([[5, 6, 7, 0, 9, 0]])
    labelled = _label_generated(out, torch.ones(1, 2, dtype=torch.long), 2, eos=0)
    assert labelled["labels"].tolist() == [[IGNORE, IGNORE, 7, 0, IGNORE, IGNORE]]
    assert labelled["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0]]


def test_on_policy_distillation_trains(tiny_dir, tokenizer):
    from tests.conftest import tiny_llama

    teacher = tiny_llama(len(tokenizer), layers=2, seed=1)
    student = tiny_llama(len(tokenizer), layers=2, seed=2)
    config = DistillConfig(on_policy=1.0, train=small_train(lr=3e-3, seq_len=32))
    stats = distill_(student, tokenizer, teacher, tokenizer, config, TEXT)
    assert stats["on_policy"] == 1.0
    assert stats["best_validation_loss"] < stats["history"][0]["validation_loss"]


def test_distill_mode_bad_inputs():
    with pytest.raises(ConfigError, match="teacher_cache cannot be used when loss is not forward_kl"):
        parse_recipe({"steps": [{"type": "distill", "loss": "jsd", "teacher_cache": "c"}]})
    with pytest.raises(ConfigError, match="teacher_cache cannot be used when on_policy > 0"):
        parse_recipe({"steps": [{"type": "distill", "on_policy": 0.5, "teacher_cache": "c"}]})
    with pytest.raises(ConfigError, match=r"on_policy is a share of batches in \[0, 1\]"):
        parse_recipe({"steps": [{"type": "distill", "on_policy": 2}]})
