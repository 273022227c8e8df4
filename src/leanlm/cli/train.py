"""What `leanlm finetune` and `leanlm distill` share: the training options (TrainConfig's fields, defaults
from the step's own config), loading, held-out perplexity and the atomic write. Both run as they are (one
CPU or GPU) or under `accelerate launch` (several processes: each trains its share, the main one writes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanlm.cli.options import (
    config_options,
    config_values,
    model_argument,
    output_options,
)

# TrainConfig's fields the commands set (eval_every also sets checkpoint_every)
TRAIN_FLAGS = {"steps": "optimizer steps",
               "max_minutes": "stop after this much training time, keeping the best weights",
               "lr": "peak learning rate",
               "batch_size": "sequences per optimizer step, over all processes",
               "micro_batch_size": "sequences per forward pass",
               "seq_len": "tokens per sequence",
               "eval_every": "steps between held-out evaluations (and checkpoints)",
               "patience": "stop after this many evaluations without improvement; 0: never",
               "gradient_checkpointing": "recompute activations in backward to save memory",
               "mixed_precision": "autocast on GPU",
               "seed": "seed of the data order and adapter init"}


def train_options(p: argparse.ArgumentParser, train_defaults, student: str) -> None:
    model_argument(p, student, required=student == "the student")
    p.add_argument("--data", help="training data: text/JSONL/parquet file or directory; a JSONL of chat 'messages' "
                                  "trains on assistant turns (default: the built-in corpus's train split)")
    config_options(p, train_defaults, TRAIN_FLAGS, prefix="train_")
    output_options(p, what="output model directory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint an interrupted run left beside OUT")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")


def _train_config(args):
    from leanlm.core.config import parse_config
    from leanlm.train.trainer import TrainConfig

    values = config_values(args, TRAIN_FLAGS, prefix="train_")
    return parse_config(TrainConfig, {**values, "checkpoint_every": values["eval_every"]}, "options")


def setup(args):
    from leanlm.core.paths import check_output
    from leanlm.data.corpus import load_corpus
    from leanlm.models.load import load_model
    from leanlm.train.examples import is_chat_file
    from leanlm.train.trainer import accelerator_for

    out = check_output(args.out, args.overwrite)
    train = _train_config(args)
    acc = accelerator_for(train)
    device = "cpu" if acc.device.type == "cpu" else str(acc.device)
    loaded = load_model(args.model, device if args.device == "auto" else args.device)
    chat = bool(args.data) and is_chat_file(args.data)
    corpus = load_corpus(None if chat else args.data, loaded.tokenizer)
    return out, train, acc, loaded, corpus, chat


def eval_ppl(model, tokenizer, text: str, window: int) -> float:
    """Perplexity on the held-out split, in windows of the training length."""
    from leanlm.errors import DataError
    from leanlm.measure.evaluate import eval_windows, score_windows

    try:
        windows = eval_windows(tokenizer, text, window)
    except DataError as err:
        raise DataError(f"the held-out 10% of the data, measured before and after training, is too short: {err} "
                        "(--seq-len sets the window)") from err
    return score_windows(model, windows, desc="eval split")["perplexity"]


def finish(acc, out: Path, overwrite: bool, save, report: dict) -> None:
    from leanlm.core.paths import atomic_dir

    if acc.is_main_process:
        with atomic_dir(out, overwrite) as tmp:
            save(tmp)
            (tmp / "leanlm-train.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    acc.wait_for_everyone()
