"""`leanlm bench`: prefill and decode tokens/s, time to first token, peak memory, size."""

from __future__ import annotations

import json

from leanlm.cli.options import (
    command,
    config_options,
    config_values,
    model_argument,
    model_options,
    runtime_option,
    set_threads,
)
from leanlm.errors import LeanLMError

# BenchConfig's fields the command sets; their defaults live on BenchConfig
FLAGS = {"prompt_tokens": "prompt length for prefill and time to first token",
         "decode_prompt_tokens": "prompt length before timed decoding",
         "new_tokens": "tokens decoded per timed run",
         "batch": "batch size of the batched decode figure",
         "repeats": "timed repeats; the median is reported",
         "warmup": "untimed warm-up runs",
         "compile": "decode with a static KV cache and a torch.compile'd step (CUDA graphs on GPU); compiling takes "
                    "a minute or more, done in the warm-up",
         "prepack": "run float32 CPU linears through oneDNN with weights prepacked once (faster at 1-16 tokens "
                    "a call; keeps a second copy of those weights)"}


def add_parser(sub) -> None:
    from leanlm.measure.bench import BenchConfig

    p = command(sub, "bench", "prefill/decode tokens/s, time to first token, peak memory, size",
                "Benchmark a model with leanlm's generation loop: warm-up, then the median of repeats.", run)
    model_argument(p, "model to benchmark")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    p.add_argument("--speculative", metavar="MODE",
                   help="measure speculative decoding against plain decoding on real prompts: lookup[:N] (prompt "
                        "lookup) or draft:MODEL (a smaller model sharing the tokenizer, e.g. leanlm's int8 of it)")
    p.add_argument("--early-exit", metavar="DIR",
                   help="measure early exit with the exit head in DIR (`leanlm distill --exit-layer K`): quality "
                        "against the full model at each confidence threshold, decode speed on real prompts, and the "
                        "threshold --kld-budget picks")
    p.add_argument("--kld-budget", type=float, default=0.05,
                   help="for --early-exit: the mean KL to the full model the chosen threshold keeps (default 0.05)")
    p.add_argument("--workload", default="grounded", metavar="KIND|FILE",
                   help="prompts for --speculative: grounded (summarize/extract/quote passages of the default "
                        "corpus's held-out split), chat (open-ended questions), or a JSONL file of "
                        "{\"messages\": [...]} / {\"prompt\": ...} records (default: grounded)")
    p.add_argument("--prompts", type=int, default=6, help="how many built-in workload prompts (default 6)")
    p.add_argument("--max-draft", type=int, default=10, help="the most tokens drafted per step (default 10)")
    runtime_option(p)
    config_options(p, BenchConfig(), FLAGS)
    model_options(p)


def run(args) -> int:
    from leanlm.core.config import parse_config
    from leanlm.measure.bench import BenchConfig, benchmark
    from leanlm.models.load import load_model

    set_threads(args)
    cfg = parse_config(BenchConfig, config_values(args, FLAGS), "options")
    if args.compile and args.runtime == "llama.cpp":
        raise LeanLMError("--compile applies to the PyTorch runtime; llama.cpp has its own")
    if args.speculative and args.early_exit:
        raise LeanLMError("--speculative and --early-exit are measured one at a time; pass one")
    if args.speculative:
        return run_speculative(args, cfg)
    if args.early_exit:
        return run_early_exit(args, cfg)
    if args.runtime == "llama.cpp":
        from leanlm.runtime.llamacpp import bench_llamacpp

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
    loop = ("compiled static-cache loop" if cfg.compile else "eager loop") + (", prepacked linears" if cfg.prepack else "")
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


def run_speculative(args, cfg) -> int:
    from leanlm.measure.speculative import bench_speculative
    from leanlm.models.load import load_model
    from leanlm.speculate.spec import make_drafter

    if args.runtime == "llama.cpp":
        raise LeanLMError("--speculative runs in leanlm's PyTorch loop; for llama.cpp use its own drafting "
                          "(llama-server --model-draft, llama-lookup)")
    if args.compile:
        raise LeanLMError("--speculative verifies drafts in the eager loop; drop --compile")
    if args.prompts < 1 or args.max_draft < 1:
        raise LeanLMError(f"--prompts and --max-draft must be at least 1; got {args.prompts} and {args.max_draft}")
    from leanlm.measure.bench import prepack
    from leanlm.runtime.onednn_linear import has_float_linears

    loaded = load_model(args.model, args.device, args.dtype)
    drafter = make_drafter(args.speculative, loaded, args.device, args.dtype)
    if cfg.prepack:
        prepack(loaded.model)
        # a draft model's or exit head's float linears too (a quantized drafter has its own kernels)
        for extra in (getattr(drafter, "model", None), getattr(drafter, "head", None)):
            if extra is not None and has_float_linears(extra):
                prepack(extra)
    prompts = workload_prompts(args.workload, args.prompts, loaded.tokenizer)
    result = bench_speculative(loaded, drafter, prompts, cfg.new_tokens, cfg.repeats, cfg.warmup, args.max_draft)
    result.update(model=args.model, speculative=args.speculative, workload=args.workload)
    if args.json:
        print(json.dumps(result))
        return 0
    same = sum(r["identical"] for r in result["prompts"])
    print(f"model: {args.model}   speculative: {args.speculative}   workload: {args.workload} "
          f"({len(prompts)} prompts, {cfg.new_tokens} new tokens, greedy; median of {cfg.repeats} after "
          f"{cfg.warmup} warm-up)")
    print(f"decode, plain        {result['plain_decode_tps']:8.2f} tokens/s")
    print(f"decode, speculative  {result['spec_decode_tps']:8.2f} tokens/s   ({result['speedup']:.2f}x)")
    print(f"acceptance rate      {result['acceptance_rate']:8.1%}")
    print(f"mean accepted draft  {result['mean_accepted_length']:8.2f} tokens")
    print(f"tokens per pass      {result['tokens_per_step']:8.2f}   (break-even {result['break_even_tokens_per_step']:.2f})")
    print(f"identical outputs    {same:5d} of {len(prompts)}")
    return 0


def run_early_exit(args, cfg) -> int:
    from leanlm.data.corpus import default_corpus
    from leanlm.measure.early_exit import bench_early_exit
    from leanlm.measure.evaluate import eval_windows
    from leanlm.models.load import load_model
    from leanlm.speculate.exit_head import load_exit_head

    if args.runtime == "llama.cpp" or args.compile:
        raise LeanLMError("--early-exit runs blocks one part at a time in leanlm's eager PyTorch loop; drop "
                          "--runtime llama.cpp and --compile")
    if not 0 < args.kld_budget or args.prompts < 1:
        raise LeanLMError(f"--kld-budget must be > 0 and --prompts >= 1; got {args.kld_budget} and {args.prompts}")
    loaded = load_model(args.model, args.device, args.dtype)
    head, split = load_exit_head(args.early_exit, loaded.model)
    if cfg.prepack:
        from leanlm.measure.bench import prepack

        from leanlm.runtime.onednn_linear import has_float_linears

        for module in (loaded.model, head):
            if has_float_linears(module):
                prepack(module)
    corpus = default_corpus()
    calibration = eval_windows(loaded.tokenizer, corpus.train[-400_000:], 512)[:8]
    held_out = eval_windows(loaded.tokenizer, corpus.eval, 512)
    prompts = workload_prompts(args.workload, args.prompts, loaded.tokenizer)
    result = bench_early_exit(loaded, head, split, prompts, calibration, held_out, args.kld_budget, cfg.new_tokens,
                              cfg.repeats, cfg.warmup)
    result.update(model=args.model, early_exit=args.early_exit, workload=args.workload)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {args.model}   exit after block {split.layer} of {split.depth}   workload: {args.workload} "
          f"({len(prompts)} prompts, {cfg.new_tokens} new tokens, greedy)   plain decode "
          f"{result['plain_decode_tps']:.2f} tokens/s")
    print(f"{'threshold':>9} {'exit share':>10} {'kld':>8} {'top1':>6} {'ppl':>7} {'tokens/s':>9} {'speedup':>8} "
          f"{'same prefix':>11}   (quality on {len(held_out)} held-out windows)")
    for r in result["timed"]:
        mark = "  <- kld budget" if r["threshold"] == result["chosen_threshold"] else ""
        print(f"{r['threshold']:9.2f} {r['exit_share']:10.1%} {r['kld']:8.4f} {r['top1']:6.3f} {r['perplexity']:7.3f} "
              f"{r['decode_tps']:9.2f} {r['speedup']:7.2f}x {r['same_prefix_share']:10.1%}{mark}")
    if result["chosen_threshold"] is None:
        print(f"no threshold keeps KL <= {args.kld_budget} on the calibration windows: every token needs the full model")
    return 0


def workload_prompts(workload: str, count: int, tokenizer) -> list[str]:
    from leanlm.data.corpus import default_corpus
    from leanlm.speculate.workload import WORKLOADS, build_prompts, read_prompts

    if workload in WORKLOADS:
        return build_prompts(workload, tokenizer, default_corpus().eval, count)
    return read_prompts(workload, tokenizer)[:count]
