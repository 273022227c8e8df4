"""Run a GGUF file in llama.cpp (through llama-cpp-python) so its quality and speed are measured
with the same windows, reference and timing rules as leanlm's own runtime.

llama-cpp-python is an optional extra that builds llama.cpp from source; see the README for the
build flags this machine's CPU needs.
"""

from __future__ import annotations

import functools
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from leanlm.core.paths import dir_size
from leanlm.errors import LeanLMError

BUILD_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF "
               "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        raise LeanLMError("running GGUF files in llama.cpp needs llama-cpp-python: pip install 'leanlm[llamacpp]' "
                          "(see docs/export.md for the build flags)") from err
    check_llama_cpp_runs()
    return llama_cpp


@functools.cache
def check_llama_cpp_runs() -> None:
    """Start llama.cpp's backend once in a child process first: a build for instructions this CPU lacks
    dies with SIGILL inside `llama_backend_init`, which would take this whole process down with it."""
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp; llama_cpp.llama_backend_init()"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode == 0:
        return
    why = (f"was killed by signal {-probe.returncode}" if probe.returncode < 0
           else f"exited with {probe.returncode}: {probe.stderr.strip()[-300:]}")
    raise LeanLMError(f"llama-cpp-python is installed but its backend {why} when started; a build for "
                      "instructions this CPU lacks (SIGILL is signal 4) must be rebuilt: "
                      f'CMAKE_ARGS="{BUILD_FLAGS}" pip install --force-reinstall --no-cache-dir '
                      "llama-cpp-python")


class LlamaCppLM:
    """A GGUF model in llama.cpp that answers `model(input_ids=...)` with `.logits` like transformers."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = True):
        self.llama_cpp = require_llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise LeanLMError(f"GGUF file {self.path} does not exist")
        self.llm = self.llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(512, n_ctx),
                                        n_threads=threads or torch.get_num_threads(), logits_all=logits_all,
                                        verbose=False)
        self.device = torch.device("cpu")

    def last_logits(self) -> np.ndarray:
        """The newest position's logits, which llama.cpp keeps even when it computes no others."""
        return np.ctypeslib.as_array(self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        rows = []
        for ids in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(ids)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))

    def parameters(self):
        return iter([torch.empty(0)])  # score_windows reads the device from the first parameter


def bench_llamacpp(path: str | Path, prompt_tokens: int = 512, decode_prompt_tokens: int = 64, new_tokens: int = 64,
                   repeats: int = 5, warmup: int = 1, threads: int | None = None) -> dict:
    """Prefill and batch-1 decode tokens/s and time to first token in llama.cpp, medians of repeats. Only the
    last position's logits are computed, as a server computes them (all 512 would add an LM-head matmul)."""
    lm = LlamaCppLM(path, n_ctx=max(prompt_tokens, decode_prompt_tokens + new_tokens) + 8, threads=threads,
                    logits_all=False)
    llm = lm.llm
    vocab = llm.n_vocab()
    prompt = [int(t) for t in torch.randint(100, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0))]
    prefill, decode = [], []
    for i in range(warmup + repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - start
        llm.reset()
        llm.eval(prompt[:decode_prompt_tokens])
        token = int(np.argmax(lm.last_logits()))
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(lm.last_logits()))
        decode_s = time.perf_counter() - start
        if i >= warmup:
            prefill.append(prefill_s)
            decode.append(decode_s)
    ttft = statistics.median(prefill)
    return {"runtime": "llama.cpp", "prefill_tps": prompt_tokens / ttft, "ttft_s": ttft,
            "decode_tps": new_tokens / statistics.median(decode), "disk_bytes": dir_size(path)}
