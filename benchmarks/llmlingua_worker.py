"""LLMLingua 0.2.2 (LongLLMLingua's question-aware settings) with SmolLM2 as its scorer, run by
benchmarks/prompt_compress.py in LLMLingua's own environment, so its pins never touch leanlm's:

    python -m venv --system-site-packages /tmp/llmlingua-venv
    /tmp/llmlingua-venv/bin/pip install llmlingua==0.2.2

Reads {"model": HF directory, "jobs": [{"context", "question", "target"}]} as JSON on stdin; prints one JSON
list of {"text", "seconds"}. Two patches, written down:
1. LLMLingua counts tokens with tiktoken's gpt-3.5-turbo encoding, which tiktoken downloads on first use
   (no network here); it is replaced by the scorer's own tokenizer, so `target_token` means SmolLM2 tokens,
   the unit every other method in the benchmark is held to.
2. LLMLingua slices the KV cache as the legacy tuple of (key, value) per layer, which transformers 5 no
   longer returns: the scorer is wrapped to take and give that tuple (the numbers are the same tensors).
"""

from __future__ import annotations

import json
import sys
import time


class _Encoding:
    """The part of a tiktoken Encoding that LLMLingua calls, over a Hugging Face tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text, *args, **kwargs):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids, *args, **kwargs):
        return self.tokenizer.decode(ids)


class _LegacyCache:
    """The scorer, taking and returning the KV cache as a list of (key, value) per layer."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, past_key_values=None, **kwargs):
        from transformers import DynamicCache

        if past_key_values is not None:
            past_key_values = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
        out = self.model(*args, past_key_values=past_key_values, **kwargs)
        out.past_key_values = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out


def main() -> None:
    import tiktoken
    from transformers import AutoTokenizer

    request = json.loads(sys.stdin.read())
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    tiktoken.encoding_for_model = lambda name: _Encoding(tokenizer)
    from llmlingua import PromptCompressor

    compressor = PromptCompressor(model_name=request["model"], device_map="cpu")
    compressor.model = _LegacyCache(compressor.model)
    out = []
    for job in request["jobs"]:
        start = time.perf_counter()
        result = compressor.compress_prompt([job["context"]], question=job["question"], target_token=job["target"],
                                            rank_method="longllmlingua", condition_in_question="after_condition",
                                            condition_compare=False, reorder_context="original",
                                            dynamic_context_compression_ratio=0.0, concate_question=False,
                                            use_context_level_filter=False)
        out.append({"text": result["compressed_prompt"], "seconds": time.perf_counter() - start})
        print(f"llmlingua {len(out)}/{len(request['jobs'])}", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
