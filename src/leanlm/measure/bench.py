"""Speed and memory: prefill and decode throughput, time to first token, peak memory, size.

The same code path (core.generate) runs on CPU and CUDA. Each figure is the median of several
repeats after a warm-up run, because these machines are shared and single runs are noisy.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass

import psutil
import torch
from tqdm.auto import tqdm

from leanlm.core.config import Validated
from leanlm.core.packed import parameter_count
from leanlm.errors import ConfigError
from leanlm.models.load import check_loaded
from leanlm.runtime.decoder import Decoder, make_decoder
from leanlm.runtime.generate import new_cache, prefill


@dataclass
class BenchConfig(Validated):
    prompt_tokens: int = 512  # prefill / time-to-first-token prompt length
    decode_prompt_tokens: int = 64
    new_tokens: int = 64
    batch: int = 8
    repeats: int = 5
    warmup: int = 1
    compile: bool = False  # decode through core.compiled_decode (static cache, torch.compile; CUDA graphs on GPU)
    prepack: bool = False  # float32 CPU linears through oneDNN with prepacked weights (runtime.onednn_linear)

    def validate(self) -> None:
        sizes = {"prompt_tokens": self.prompt_tokens, "decode_prompt_tokens": self.decode_prompt_tokens,
                 "new_tokens": self.new_tokens, "batch": self.batch, "repeats": self.repeats}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad or self.warmup < 0:
            raise ConfigError(f"benchmark sizes must be at least 1 (warmup at least 0); got "
                              f"{', '.join(f'{k}={v}' for k, v in (bad or {'warmup': self.warmup}).items())}")
        if self.compile and self.warmup < 1:
            raise ConfigError("--compile needs at least one warm-up run (--warmup 1; in a recipe, bench: {warmup: 1}), "
                              "or the compile time is timed")


class PeakMemory:
    """Peak process RSS (sampled) on CPU, or peak allocated bytes on CUDA, during a block."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, cfg: BenchConfig, device: torch.device, desc: str) -> float:
    times = []
    for i in tqdm(range(cfg.warmup + cfg.repeats), desc=desc, leave=False):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_prefill(model, ids: torch.Tensor, cfg: BenchConfig, device) -> float:
    def run():
        prefill(model, ids, new_cache(model)).argmax(-1)
    return _median_seconds(run, cfg, device, f"prefill x{ids.shape[0]}")


def bench_decoder(model, cfg: BenchConfig) -> Decoder:
    if cfg.compile and cfg.warmup < 1:
        raise ValueError("the compiled loop needs a warm-up run: compiling happens there, and must not be timed")
    return make_decoder(model, cfg.compile, max_len=cfg.decode_prompt_tokens + cfg.new_tokens + 1)


def time_decode(decoder, ids: torch.Tensor, cfg: BenchConfig, device) -> float:
    """Seconds for `new_tokens` decode steps after a prefill that is not timed."""
    times = []
    for i in tqdm(range(cfg.warmup + cfg.repeats), desc=f"decode x{ids.shape[0]}", leave=False):
        cache = decoder.new_cache(ids.shape[0])
        token = decoder.prefill(ids, cache).argmax(-1, keepdim=True)
        _sync(device)
        start = time.perf_counter()
        for _ in range(cfg.new_tokens):
            token = decoder.decode_one_token(token, cache).argmax(-1, keepdim=True)
        _sync(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepack(model) -> int:
    """Prepack the float32 CPU linears in place (once; a model already packed is left as it is)."""
    from leanlm.runtime.onednn_linear import PackedLinear, pack_linears

    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return 0
    try:
        return pack_linears(model)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--prepack: {e}") from None


def _quant_kernels(device: torch.device) -> str:
    from leanlm.kernels import kernel_status

    return kernel_status() if device.type == "cpu" else "torch (CUDA: tinygemm int4, dequantize int8)"


def benchmark(loaded, cfg: BenchConfig | None = None, seed: int = 0) -> dict:
    """Benchmark one loaded model; prompts are random token ids (speed does not depend on content)."""
    check_loaded(loaded, "benchmark")
    cfg = cfg or BenchConfig()
    model, device = loaded.model, loaded.device
    if cfg.prepack:
        prepack(model)
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, cfg.prompt_tokens), generator=gen).to(device)
    short = torch.randint(0, vocab, (cfg.batch, cfg.decode_prompt_tokens), generator=gen).to(device)
    with PeakMemory(device) as mem:
        ttft = time_prefill(model, prompt, cfg, device)
        decoder = bench_decoder(model, cfg)
        decode = time_decode(decoder, short[:1], cfg, device)
        decode_batch = time_decode(decoder, short, cfg, device) if cfg.batch > 1 else decode
    params = parameter_count(model)
    return {
        "prefill_tps": cfg.prompt_tokens / ttft,
        "decode_tps": cfg.new_tokens / decode,
        "decode_tps_batch": cfg.batch * cfg.new_tokens / decode_batch,
        "ttft_s": ttft,
        "peak_mem_bytes": mem.peak,
        "disk_bytes": loaded.disk_bytes,
        "params": params,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "quant_kernels": _quant_kernels(device) if any(hasattr(m, "packed_params") for m in model.modules()) else None,
        "config": asdict(cfg),
    }
