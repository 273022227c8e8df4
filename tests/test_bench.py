import pytest

from leanlm.core.bench import BenchConfig, benchmark


def test_benchmark_reports_every_figure(tiny):
    cfg = BenchConfig(prompt_tokens=32, decode_prompt_tokens=8, new_tokens=4, batch=2, repeats=2, warmup=1)
    out = benchmark(tiny, cfg)
    for key in ("prefill_tps", "decode_tps", "decode_tps_batch", "ttft_s", "peak_mem_bytes", "disk_bytes"):
        assert out[key] > 0, key
    assert out["params"] == sum(p.numel() for p in tiny.model.parameters())
    assert out["ttft_s"] == pytest.approx(32 / out["prefill_tps"])
