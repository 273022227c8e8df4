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
                    "a minute or more, done in the warm-up"}


def add_parser(sub) -> None:
    from leanlm.measure.bench import BenchConfig

    p = command(sub, "bench", "prefill/decode tokens/s, time to first token, peak memory, size",
                "Benchmark a model with leanlm's generation loop: warm-up, then the median of repeats.", run)
    model_argument(p, "model to benchmark")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
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
