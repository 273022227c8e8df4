"""`leanlm finetune` and `leanlm distill`: the training commands, runnable as they are (one CPU or GPU)
or under `accelerate launch` (several processes: each trains its share, the main one writes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


DEFAULT_MODEL = "smollm2-135m"


def _train_options(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--data", help="training data: text/JSONL/parquet file or directory; a JSONL of chat 'messages' "
                                  "trains on assistant turns (default: the built-in corpus's train split)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    p.add_argument("--max-minutes", type=float, help="stop after this much training time, keeping the best weights")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr})")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step, over all processes (default: 8)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations (default: 25)")
    p.add_argument("--patience", type=int, default=3, help="stop after this many evaluations without improvement; 0: never (default: 3)")
    p.add_argument("--too-long", default="truncate", choices=["truncate", "refuse"],
                   help="a chat longer than --seq-len: truncate it with a warning, or refuse (default: truncate)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast on GPU (default: no)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint an interrupted run left beside OUT")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")


def add_parsers(sub) -> None:
    p = sub.add_parser("finetune", help="full or LoRA fine-tuning on your text or chat data",
                       description="Fine-tune a model (full, or LoRA through PEFT with targets found from the module "
                                   "graph) with held-out early stopping and resumable checkpoints; the LoRA is merged "
                                   "unless --no-merge. Eval-split perplexity is measured before and after. Runs under "
                                   "`accelerate launch` for several processes.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default: 32)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    p.add_argument("--targets", nargs="+", default=["*"], help="glob patterns of the linear layers to adapt (default: all in the blocks)")
    p.add_argument("--no-merge", action="store_true", help="save the LoRA adapter (PEFT format) instead of merged weights")
    p.add_argument("--requantize", default="gptq", choices=["gptq", "rtn"],
                   help="on a leanlm-quantized model (QLoRA), how the merged layers are quantized again: GPTQ on "
                        "128 x 512 tokens of the training text keeps the adapter's gain; rtn re-rounds (default: gptq)")
    _train_options(p, lr=2e-4)

    p = sub.add_parser("distill", help="train a student to match a teacher's distributions",
                       description="Distil a teacher into a student sharing its tokenizer (e.g. a pruned or quantized "
                                   "copy): forward KL, reverse KL or generalized JSD with temperature, optionally with "
                                   "final-hidden-state matching. Eval-split perplexity is measured before and after.")
    p.add_argument("model", help="the student")
    p.add_argument("--teacher", required=True, help="the teacher model")
    p.add_argument("--loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--beta", type=float, default=0.5, help="generalized JSD's beta (default: 0.5)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of final-hidden-state MSE (same width only)")
    p.add_argument("--on-policy", type=float, default=0.0,
                   help="share of training batches on continuations the student samples itself (GKD; default: 0)")
    p.add_argument("--teacher-cache", metavar="DIR",
                   help="cache the teacher's top-k logits in DIR and reuse them in later runs on the same teacher "
                        "and data (forward_kl only; a cache hit never loads the teacher)")
    p.add_argument("--cache-top-k", type=int, default=64, help="logits kept per position in the cache (default: 64)")
    _train_options(p, lr=5e-5)


def _train_config(args):
    from leanlm.core.trainer import TrainConfig
    from leanlm.core.config import parse_config

    return parse_config(TrainConfig, {
        "steps": args.steps, "max_minutes": args.max_minutes, "lr": args.lr, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len, "eval_every": args.eval_every,
        "checkpoint_every": args.eval_every, "patience": args.patience, "seed": args.seed,
        "gradient_checkpointing": args.gradient_checkpointing, "mixed_precision": args.mixed_precision}, "options")


def _setup(args):
    from leanlm.core.data import load_corpus
    from leanlm.core.models import load_model
    from leanlm.core.paths import check_output
    from leanlm.core.train_data import is_chat_file
    from leanlm.core.trainer import accelerator_for

    out = check_output(args.out, args.overwrite)
    train = _train_config(args)
    acc = accelerator_for(train)
    device = "cpu" if acc.device.type == "cpu" else str(acc.device)
    loaded = load_model(args.model, device if args.device == "auto" else args.device)
    chat = bool(args.data) and is_chat_file(args.data)
    corpus = load_corpus(None if chat else args.data, loaded.tokenizer)
    return out, train, acc, loaded, corpus, chat


def _eval_ppl(model, tokenizer, text: str, window: int) -> float:
    """Perplexity on the held-out split, in windows of the training length."""
    from leanlm.core.evaluate import eval_windows, score_windows
    from leanlm.errors import DataError

    try:
        windows = eval_windows(tokenizer, text, window)
    except DataError as err:
        raise DataError(f"the held-out 10% of the data, measured before and after training, is too short: {err} "
                        "(--seq-len sets the window)") from err
    return score_windows(model, windows, desc="eval split")["perplexity"]


def _finish(acc, out: Path, overwrite: bool, save, report: dict) -> None:
    from leanlm.core.paths import atomic_dir

    if acc.is_main_process:
        with atomic_dir(out, overwrite) as tmp:
            save(tmp)
            (tmp / "leanlm-train.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    acc.wait_for_everyone()


def cmd_finetune(args) -> int:
    from leanlm.core.data import calibration_samples
    from leanlm.core.models import QUANTIZED_MODULES, save_model
    from leanlm.errors import ConfigError
    from leanlm.finetune import FinetuneConfig, finetune_
    from leanlm.core.config import parse_config

    out, train, acc, loaded, corpus, chat = _setup(args)
    config = parse_config(FinetuneConfig, {"method": args.method, "data": args.data if chat else None,
                                           "too_long": args.too_long, "rank": args.rank, "alpha": args.alpha,
                                           "dropout": args.dropout, "targets": args.targets,
                                           "merge": not args.no_merge, "requantize": args.requantize}, "options")
    config.train = train
    if args.no_merge and any(type(m) in QUANTIZED_MODULES.values() for m in loaded.model.modules()):
        raise ConfigError(f"{args.model} is a leanlm-quantized model: its LoRA is merged and requantized "
                          "(--requantize); saving an unmerged adapter over packed layers is not supported")
    measure = not chat and acc.is_main_process
    before = _eval_ppl(loaded.model, loaded.tokenizer, corpus.eval, train.seq_len) if measure else None
    model, stats = finetune_(loaded.model, loaded.tokenizer, config, None if chat else corpus.train,
                             out.parent / f".{out.name}.work", accelerator=acc, source=str(loaded.path),
                             resume=args.resume, device=loaded.device,
                             calibration=lambda: calibration_samples(loaded.tokenizer, corpus.train, 128, 512))
    if before is not None:
        stats.update(eval_perplexity_before=before,
                     eval_perplexity_after=_eval_ppl(model, loaded.tokenizer, corpus.eval, train.seq_len))

    def save(tmp: Path) -> None:
        if config.merge:
            save_model(model, loaded.tokenizer, tmp)
        else:
            model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)

    _finish(acc, out, args.overwrite, save, {"command": "finetune", "model": args.model, **stats})
    return 0


def cmd_distill(args) -> int:
    from leanlm.core.models import save_model
    from leanlm.distill import DistillConfig, distill_
    from leanlm.distill.distill import Teacher
    from leanlm.core.config import parse_config

    out, train, acc, loaded, corpus, chat = _setup(args)
    config = parse_config(DistillConfig, {"teacher": args.teacher, "loss": args.loss, "beta": args.beta,
                                          "temperature": args.temperature, "hidden_weight": args.hidden_weight,
                                          "on_policy": args.on_policy, "teacher_cache": args.teacher_cache,
                                          "cache_top_k": args.cache_top_k, "data": args.data if chat else None},
                          "options")
    config.train = train
    config.check(loaded.model)  # a teacher that cannot be found fails before the student is measured
    teacher = Teacher(source=args.teacher, device="cpu" if acc.device.type == "cpu" else str(acc.device))
    measure = not chat and acc.is_main_process
    before = _eval_ppl(loaded.model, loaded.tokenizer, corpus.eval, train.seq_len) if measure else None
    stats = distill_(loaded.model, loaded.tokenizer, teacher, config=config, text=None if chat else corpus.train,
                     work_dir=out.parent / f".{out.name}.work", accelerator=acc, resume=args.resume)
    if before is not None:
        stats.update(eval_perplexity_before=before,
                     eval_perplexity_after=_eval_ppl(loaded.model, loaded.tokenizer, corpus.eval, train.seq_len))
        if teacher.model is not None:  # not loaded at all when the cached logits served
            stats["teacher_eval_perplexity"] = _eval_ppl(teacher.model, teacher.tokenizer, corpus.eval, train.seq_len)
    _finish(acc, out, args.overwrite, lambda tmp: save_model(loaded.model, loaded.tokenizer, tmp),
            {"command": "distill", "student": args.model, "teacher": args.teacher, **stats})
    return 0


COMMANDS = {"finetune": cmd_finetune, "distill": cmd_distill}
