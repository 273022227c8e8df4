"""`leanlm eval`: perplexity, KLD and top-1 against a reference, task accuracy, generations."""

from __future__ import annotations

import json

from leanlm.cli.options import (
    command,
    model_argument,
    model_options,
    runtime_option,
    set_threads,
)
from leanlm.errors import LeanLMError


def add_parser(sub) -> None:
    p = command(sub, "eval", "perplexity, KLD/top-1 vs a reference, task accuracy, generations",
                "Evaluate a model on held-out text: perplexity over non-overlapping windows; with --reference, mean "
                "KL(reference || model) and top-1 agreement on the same windows (llama.cpp's method; reference logits "
                "are cached on disk); with --tasks, multiple-choice accuracy by log-likelihood; and a few greedy "
                "generations.", run)
    model_argument(p, "model to evaluate")
    p.add_argument("--reference", help="reference model for KLD and top-1 (e.g. the unquantized original)")
    p.add_argument("--data", help="held-out text, evaluated whole (default: the eval split of the built-in corpus)")
    p.add_argument("--tasks", help="JSONL of multiple-choice tasks: {question, choices: [...], answer: index}")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--prompt", action="append", help="prompt for a greedy generation (repeatable; default: 3 built-in prompts)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generation (default: 32)")
    p.add_argument("--no-generate", action="store_true", help="skip the generations")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    runtime_option(p)
    model_options(p)


def run(args) -> int:
    from leanlm.core.structure import check_token_ids
    from leanlm.data.corpus import default_corpus, read_text
    from leanlm.measure.evaluate import (
        DEFAULT_PROMPTS,
        eval_windows,
        evaluate,
        load_tasks,
        prepare_reference,
    )
    from leanlm.models.load import load_model

    set_threads(args)
    tasks = load_tasks(args.tasks) if args.tasks else None
    prompts = [] if args.no_generate else (args.prompt or DEFAULT_PROMPTS)
    loaded = load_model(args.model, args.device, args.dtype)
    if args.runtime == "llama.cpp":
        loaded, prompts = _in_llama_cpp(loaded, args.model), []  # generations are leanlm's loop only
    text = read_text(args.data, loaded.tokenizer) if args.data else default_corpus().eval
    windows = eval_windows(loaded.tokenizer, text, args.window)
    check_token_ids(loaded.model, windows, "the evaluation text")  # before the reference is computed
    reference = None
    if args.reference:
        same = args.reference == args.model
        ref_model = loaded if same else load_model(args.reference, args.device, args.dtype)
        reference = prepare_reference(ref_model, windows, prompts, args.max_new_tokens)
        del ref_model
    result = evaluate(loaded, windows, reference, tasks, prompts, args.max_new_tokens)
    gens = result["generations"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {args.model}   text: {args.data or 'pydoc_data.topics (eval split)'}   {result['windows']} windows x {args.window} tokens")
    print(f"perplexity       {result['perplexity']:.4f}   ({result['tokens']} predicted tokens)")
    if reference is not None:
        print(f"mean KLD         {result['kld']:.6f}   (reference: {args.reference}, perplexity {reference.perplexity:.4f})")
        print(f"top-1 agreement  {result['top1']:.2%}")
    if tasks:
        print(f"task accuracy    {result['task_accuracy']:.2%}   (length-normalised {result['task_accuracy_norm']:.2%}, {result['tasks']} tasks)")
    if "measured_act_sparsity" in result:
        print(f"act. sparsity    {result['measured_act_sparsity']:.1%}   (inputs the activation-sparse layers skipped on "
              "this text, weighted by layer size)")
    for p, text in gens.items():
        print(f"\n>>> {p}\n  model:     {text!r}")
        if reference is not None and p in reference.generations:
            print(f"  reference: {reference.generations[p]!r}")
    return 0


def _in_llama_cpp(loaded, source: str):
    """The same model and tokenizer, its forward passes run by llama.cpp instead of PyTorch."""
    from leanlm.runtime.llamacpp import LlamaCppLM

    if not str(source).endswith(".gguf"):
        raise LeanLMError(f"--runtime llama.cpp runs .gguf files; export first: leanlm export {source} --format gguf")
    loaded.model = LlamaCppLM(source)
    return loaded
