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
    p.add_argument("--teacher", required=True, help="the teacher model")
    defaults = DistillConfig()
    config_options(p, defaults, FLAGS)
    train_options(p, defaults.train, "the student")


def run(args) -> int:
    from leanlm.core.config import parse_config
    from leanlm.distill import DistillConfig, distill_
    from leanlm.distill.distill import Teacher
    from leanlm.models.save import save_model

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
