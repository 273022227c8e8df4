"""Fine-tuning and distillation on tiny models: data handling, losses, the shared trainer (early
stopping, checkpoints, refusing a foreign resume) and 2 processes matching 1 under accelerate."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from leanlm.data.corpus import default_corpus
from leanlm.distill import DistillConfig, distill_, distill_ops
from leanlm.errors import ConfigError, DataError
from leanlm.finetune import FinetuneConfig, finetune_
from leanlm.models.load import load_model
from leanlm.pipeline.recipe import parse_recipe
from leanlm.prune.depth import remove_blocks
from leanlm.train.examples import IGNORE, chat_examples, chat_tokens
from leanlm.train.trainer import TrainConfig

TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
TEXT = default_corpus().train[:40_000]


def small_train(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, micro_batch_size=2, seq_len=64, lr=3e-3, warmup_steps=1, eval_every=3,
                checkpoint_every=2, patience=0, validation_fraction=0.1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def chat_tok(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def test_chat_labels_cover_only_assistant_turns(chat_tok):
    messages = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."},
                {"role": "user", "content": "And a dict?"}, {"role": "assistant", "content": "A mapping."}]
    ids, labels = chat_tokens(chat_tok, messages, "x:1")
    learned = chat_tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert "A sequence." in learned and "A mapping." in learned
    assert "What is a list" not in learned and "dict" not in learned


def test_chat_bad_inputs(chat_tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: conversation has no assistant turn"):
        chat_examples(chat_tok, path, 64)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi " * 50},
                                             {"role": "assistant", "content": "yo " * 50}]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: \d+ tokens, longer than seq_len 32"):
        chat_examples(chat_tok, path, 32, too_long="refuse")
    ex = chat_examples(chat_tok, path, 32)  # truncated with a warning
    assert ex.input_ids.shape == (1, 32)


def test_distillation_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(10, 50, generator=g), torch.randn(10, 50, generator=g)
    assert distill_ops.forward_kl(t, t).abs() < 1e-4 and distill_ops.generalized_jsd(t, t).abs() < 1e-4
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    torch.testing.assert_close(distill_ops.forward_kl(s, t), ref)
    torch.testing.assert_close(distill_ops.generalized_jsd(s, t, beta=0), ref)
    torch.testing.assert_close(distill_ops.generalized_jsd(s, t, beta=1), distill_ops.reverse_kl(s, t))
    assert 0 < distill_ops.generalized_jsd(s, t, 0.5) < 10 * torch.log(torch.tensor(2.0))


def test_lora_finetune_lowers_validation_loss_and_merges(tiny, tmp_path):
    config = FinetuneConfig(method="lora", rank=4, alpha=8, dropout=0.0, train=small_train())
    model, stats = finetune_(tiny.model, tiny.tokenizer, config, TEXT, tmp_path / "work")
    assert model is tiny.model and not any("lora" in n for n, _ in model.named_modules())
    assert stats["best_validation_loss"] < stats["history"][0]["validation_loss"]
    assert 0 < stats["trainable_params"] < stats["total_params"] / 5
    assert (tmp_path / "work" / "checkpoint.pt").is_file()


def test_lora_target_that_matches_nothing_is_refused(tiny):
    config = FinetuneConfig(targets=["*.attention.wq"], train=small_train())
    with pytest.raises(ConfigError, match=r"match no linear layer inside the decoder blocks \(e.g. model.layers.0"):
        finetune_(tiny.model, tiny.tokenizer, config, TEXT)


def test_training_verbs_refuse_what_they_cannot_train(tiny):
    with pytest.raises(ConfigError, match="the training text must be a str, got list"):
        finetune_(tiny.model, tiny.tokenizer, FinetuneConfig(), text=["a", "b"])
    with pytest.raises(ConfigError, match="training needs data: set the config's 'data'"):
        finetune_(tiny.model, tiny.tokenizer, FinetuneConfig())
    with pytest.raises(ConfigError, match="finetune_: the config must be a FinetuneConfig, got dict"):
        finetune_(tiny.model, tiny.tokenizer, {"method": "lora"}, text="x")
    with pytest.raises(ConfigError, match="distill_: the model must be a torch nn.Module .*got LoadedModel: pass its .model"):
        distill_(tiny, tiny.tokenizer, tiny.model, text="x")
    with pytest.raises(ConfigError, match="distill_: the teacher must be an nn.Module or a Teacher, got str"):
        distill_(tiny.model, tiny.tokenizer, "smollm2-135m", text="x")


def test_resume_continues_and_refuses_a_different_recipe(tiny_dir, tmp_path):
    work = tmp_path / "work"
    first = load_model(tiny_dir, device="cpu")
    finetune_(first.model, first.tokenizer, FinetuneConfig(method="full", train=small_train(steps=4)), TEXT, work)
    again = load_model(tiny_dir, device="cpu")
    _, stats = finetune_(again.model, again.tokenizer, FinetuneConfig(method="full", train=small_train(steps=4)),
                         TEXT, work, resume=True)
    assert stats["steps"] == 4 and stats["seconds"] < 5  # nothing left to do after the step-4 checkpoint
    other = load_model(tiny_dir, device="cpu")
    with pytest.raises(ConfigError, match="different recipe, model or data"):
        finetune_(other.model, other.tokenizer, FinetuneConfig(method="full", train=small_train(steps=4, lr=1e-3)),
                  TEXT, work, resume=True)


def test_distill_heals_a_depth_pruned_student(tiny_dir, tokenizer):
    from tests.conftest import tiny_llama

    teacher = tiny_llama(len(tokenizer), layers=3)
    student = copy.deepcopy(teacher)
    remove_blocks(student, [1])
    stats = distill_(student, tokenizer, teacher, tokenizer, DistillConfig(loss="jsd", train=small_train(lr=1e-3)), TEXT)
    assert stats["best_validation_loss"] < stats["history"][0]["validation_loss"]


def test_distill_bad_inputs(tokenizer, chat_tok):
    from tests.conftest import build_tokenizer, tiny_llama

    model = tiny_llama(len(tokenizer))
    other = build_tokenizer(vocab_size=300)
    with pytest.raises(ConfigError, match="teacher and student tokenizers differ"):
        distill_(model, tokenizer, model, other, DistillConfig(train=small_train()), TEXT)
    with pytest.raises(ConfigError, match="need beta in"):
        parse_recipe({"steps": [{"type": "distill", "beta": 2}]})
    with pytest.raises(ConfigError, match="unknown key 'epochs'"):
        parse_recipe({"steps": [{"type": "finetune", "train": {"epochs": 3}}]})


def _finetune_cli(launcher: list[str], tiny_dir, out) -> dict:
    cmd = [*launcher, "-m", "leanlm", "finetune", str(tiny_dir), "--method", "full", "--steps", "3",
           "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "64", "--lr", "1e-3", "--eval-every", "3",
           "--patience", "0", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "leanlm-train.json").read_text())


def test_two_processes_match_one_with_the_same_global_batch(tiny_dir, tmp_path):
    one = _finetune_cli([sys.executable], tiny_dir, tmp_path / "one")
    # torchrun is what `accelerate launch --multi_gpu` runs underneath; on CPU, Accelerate picks gloo
    two = _finetune_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         "29517"], tiny_dir, tmp_path / "two")
    assert one["processes"] == 1 and two["processes"] == 2
    flat = [torch.cat([p.flatten() for p in load_model(d, device="cpu").model.parameters()])
            for d in (tiny_dir, tmp_path / "one", tmp_path / "two")]
    moved = (flat[1] - flat[0]).abs().mean().item()
    apart = (flat[1] - flat[2]).abs().mean().item()
    # summation order differs across processes; Adam can amplify that only for near-zero gradients
    assert moved > 1e-4 and apart < 1e-3 * moved
    assert one["best_validation_loss"] == pytest.approx(two["best_validation_loss"], rel=1e-4)


def test_a_time_limit_stop_still_judges_the_last_steps(tiny):
    config = FinetuneConfig(method="full", train=small_train(steps=50, eval_every=40, max_minutes=1e-6))
    _, stats = finetune_(tiny.model, tiny.tokenizer, config, TEXT)
    assert stats["stopped_by"] == "max_minutes" and stats["steps"] == 1
    assert [h["step"] for h in stats["history"]] == [0, 1]  # evaluated at the stop, not only every 40 steps


def test_held_out_split_too_short_names_the_option(tiny):
    from leanlm.cli.train import eval_ppl

    assert eval_ppl(tiny.model, tiny.tokenizer, TEXT[:4000], 32) > 1
    with pytest.raises(DataError, match=r"held-out 10% of the data.*fewer than one 4096-token window.*--seq-len"):
        eval_ppl(tiny.model, tiny.tokenizer, TEXT[:4000], 4096)


def test_distill_command_refuses_a_missing_teacher_before_measuring(tiny_dir, tmp_path, monkeypatch, capsys):
    from leanlm.cli import main
    from leanlm.cli import distill as cli_distill

    monkeypatch.setattr(cli_distill, "eval_ppl", lambda *a, **k: pytest.fail("measured before refusing"))
    assert main(["distill", str(tiny_dir), "--teacher", "/no/such/teacher", "--out", str(tmp_path / "d")]) == 2
    assert "'/no/such/teacher' not found" in capsys.readouterr().err and not (tmp_path / "d").exists()
