"""`leanlm distill`: train a student to match a teacher's distributions."""

from __future__ import annotations

from leanlm.cli.options import command, config_options, config_values
from leanlm.cli.train import eval_ppl, finish, setup, train_options

# DistillConfig's fields the command sets; their defaults live on DistillConfig
FLAGS = {"loss": "what the student minimizes against the teacher",
         "beta": "generalized JSD's beta",
         "temperature": "softmax temperature of both distributions",
         "hidden_weight": "weight of final-hidden-state MSE (same width only)",
         "on_policy": "share of training batches on continuations the student samples itself (GKD)",
         "teacher_cache": "cache the teacher's top-k logits in this directory and reuse them in later runs on the "
                          "same teacher and data (forward_kl only; a cache hit never loads the teacher)",
         "cache_top_k": "logits kept per position in the cache"}


def add_parser(sub) -> None:
    from leanlm.distill import DistillConfig

    p = command(sub, "distill", "train a student to match a teacher's distributions",
                "Distil a teacher into a student sharing its tokenizer (e.g. a pruned or quantized copy): forward KL, "
                "reverse KL or generalized JSD with temperature, optionally with final-hidden-state matching. "
                "Eval-split perplexity is measured before and after.", run)
    p.add_argument("--teacher", help="the teacher model (required unless --exit-layer)")
    p.add_argument("--exit-layer", type=int, metavar="K",
                   help="instead, train an early exit after block K of MODEL against MODEL itself (exit-aware "
                        "distillation): a small adapter and norm before the frozen LM head, saved to OUT for "
                        "`bench --speculative self:OUT` and `bench --early-exit OUT`; the model is not changed")
    p.add_argument("--exit-steps", type=int, default=300, help="training steps for --exit-layer (default 300)")
    p.add_argument("--exit-lr", type=float, default=1e-3, help="peak learning rate for --exit-layer (default 1e-3)")
    p.add_argument("--exit-width", type=int, default=None,
                   help="the exit adapter's hidden width (default: twice the model's; 0: norm only)")
    defaults = DistillConfig()
    config_options(p, defaults, FLAGS)
    train_options(p, defaults.train, "the student")


def run(args) -> int:
    from leanlm.core.config import parse_config
    from leanlm.errors import ConfigError
    from leanlm.distill import DistillConfig, distill_
    from leanlm.distill.distill import Teacher
    from leanlm.models.save import save_model

    if args.exit_layer is not None:
        return run_exit(args)
    if not args.teacher:
        raise ConfigError("distill needs --teacher MODEL (or --exit-layer K to train an early exit of the model)")
    out, train, acc, loaded, corpus, chat = setup(args)
    config = parse_config(DistillConfig, {**config_values(args, FLAGS), "teacher": args.teacher,
                                          "data": args.data if chat else None}, "options")
    config.train = train
    config.check(loaded.model)  # a teacher that cannot be found fails before the student is measured
    teacher = Teacher(source=args.teacher, device="cpu" if acc.device.type == "cpu" else str(acc.device))
    measure = not chat and acc.is_main_process
    before = eval_ppl(loaded.model, loaded.tokenizer, corpus.eval, train.seq_len) if measure else None
    stats = distill_(loaded.model, loaded.tokenizer, teacher, config=config, text=None if chat else corpus.train,
                     work_dir=out.parent / f".{out.name}.work", accelerator=acc, resume=args.resume)
    if before is not None:
        stats.update(eval_perplexity_before=before,
                     eval_perplexity_after=eval_ppl(loaded.model, loaded.tokenizer, corpus.eval, train.seq_len))
        if teacher.model is not None:  # not loaded at all when the cached logits served
            stats["teacher_eval_perplexity"] = eval_ppl(teacher.model, teacher.tokenizer, corpus.eval, train.seq_len)
    finish(acc, out, args.overwrite, lambda tmp: save_model(loaded.model, loaded.tokenizer, tmp),
            {"command": "distill", "student": args.model, "teacher": args.teacher, **stats})
    return 0


def run_exit(args) -> int:
    """Train and save an exit head, and show on the held-out split what it would let leave early."""
    import json

    from leanlm.errors import ConfigError
    from leanlm.measure.evaluate import eval_windows
    from leanlm.speculate.early_exit import exit_quality
    from leanlm.speculate.exit_head import save_exit_head, train_exit_head
    from leanlm.speculate.split import LayerSplit

    if args.teacher:
        raise ConfigError("--exit-layer trains the model's early exit against the model itself; drop --teacher")
    out, train, acc, loaded, corpus, chat = setup(args)
    if chat:
        raise ConfigError(f"--exit-layer learns from plain text, and {args.data} is a chat JSONL; pass its text as a "
                          ".txt file, or leave out --data for the built-in corpus")
    head, stats = train_exit_head(loaded.model, loaded.tokenizer, corpus.train, args.exit_layer,
                                  steps=args.exit_steps, width=args.exit_width, seq_len=train.seq_len,
                                  lr=args.exit_lr, seed=train.seed)
    split = LayerSplit(loaded.model, args.exit_layer)
    windows = eval_windows(loaded.tokenizer, corpus.eval, train.seq_len)[:8]
    rows = exit_quality(loaded.model, head, split, windows)
    stats["eval"] = rows
    save_exit_head(head, split, out, stats, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in stats.items() if k != "eval"}, indent=2))
    print(f"\nheld-out split ({len(windows)} windows), exit after block {args.exit_layer} of {split.depth}, "
          "by confidence threshold (a token exits when the exit's top probability reaches it):")
    print(f"{'threshold':>9} {'exit share':>10} {'kld':>8} {'top1':>7} {'ppl':>8}")
    for r in rows:
        print(f"{r['threshold']:9.2f} {r['exit_share']:10.1%} {r['kld']:8.4f} {r['top1']:7.3f} {r['perplexity']:8.3f}")
    print(f"saved to {out}")
    return 0

