"""`leanlm finetune`: full or LoRA fine-tuning on your text or chat data, eval-split perplexity before and after."""

from __future__ import annotations

from pathlib import Path

from leanlm.cli.options import command, config_options, config_values
from leanlm.cli.train import eval_ppl, finish, setup, train_options

# FinetuneConfig's fields the command sets; their defaults live on FinetuneConfig
FLAGS = {"method": "full fine-tuning or LoRA (PEFT)",
         "rank": "LoRA rank", "alpha": "LoRA alpha", "dropout": "LoRA dropout",
         "targets": "glob patterns of the linear layers to adapt (all in the blocks by default)",
         "merge": "save the LoRA adapter (PEFT format) instead of merged weights",
         "requantize": "on a leanlm-quantized model (QLoRA), how the merged layers are quantized again: GPTQ on "
                       "128 x 512 tokens of the training text keeps the adapter's gain; rtn re-rounds",
         "too_long": "a chat longer than --seq-len: truncate it with a warning, or refuse"}


def add_parser(sub) -> None:
    from leanlm.finetune import FinetuneConfig

    p = command(sub, "finetune", "full or LoRA fine-tuning on your text or chat data",
                "Fine-tune a model (full, or LoRA through PEFT with targets found from the module graph) with held-out "
                "early stopping and resumable checkpoints; the LoRA is merged unless --no-merge. Eval-split perplexity "
                "is measured before and after. Runs under `accelerate launch` for several processes.", run)
    defaults = FinetuneConfig()
    config_options(p, defaults, FLAGS)
    train_options(p, defaults.train, "model to fine-tune")


def run(args) -> int:
    from leanlm.core.config import parse_config
    from leanlm.core.packed import is_runtime_module
    from leanlm.data.corpus import calibration_samples
    from leanlm.errors import ConfigError
    from leanlm.finetune import FinetuneConfig, finetune_
    from leanlm.models.save import save_model

    out, train, acc, loaded, corpus, chat = setup(args)
    config = parse_config(FinetuneConfig, {**config_values(args, FLAGS), "data": args.data if chat else None},
                          "options")
    config.train = train
    if not args.merge and any(is_runtime_module(m) for m in loaded.model.modules()):
        raise ConfigError(f"{args.model} is a leanlm-quantized model: its LoRA is merged and requantized "
                          "(--requantize); saving an unmerged adapter over packed layers is not supported")
    measure = not chat and acc.is_main_process
    before = eval_ppl(loaded.model, loaded.tokenizer, corpus.eval, train.seq_len) if measure else None
    model, stats = finetune_(loaded.model, loaded.tokenizer, config, None if chat else corpus.train,
                             out.parent / f".{out.name}.work", accelerator=acc, source=str(loaded.path),
                             resume=args.resume, device=loaded.device,
                             calibration=lambda: calibration_samples(loaded.tokenizer, corpus.train, 128, 512))
    if before is not None:
        stats.update(eval_perplexity_before=before,
                     eval_perplexity_after=eval_ppl(model, loaded.tokenizer, corpus.eval, train.seq_len))

    def save(tmp: Path) -> None:
        if config.merge:
            save_model(model, loaded.tokenizer, tmp)
        else:
            model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)

    finish(acc, out, args.overwrite, save, {"command": "finetune", "model": args.model, **stats})
    return 0
