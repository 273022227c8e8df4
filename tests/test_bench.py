import pytest

from leanlm.measure.bench import BenchConfig, benchmark


def test_benchmark_reports_every_figure(tiny):
    cfg = BenchConfig(prompt_tokens=32, decode_prompt_tokens=8, new_tokens=4, batch=2, repeats=2, warmup=1)
    out = benchmark(tiny, cfg)
    for key in ("prefill_tps", "decode_tps", "decode_tps_batch", "ttft_s", "peak_mem_bytes", "disk_bytes"):
        assert out[key] > 0, key
    assert out["params"] == sum(p.numel() for p in tiny.model.parameters())
    assert out["ttft_s"] == pytest.approx(32 / out["prefill_tps"])


def test_benchmark_refuses_a_path_for_a_loaded_model(tiny_dir):
    from leanlm.errors import ConfigError

    with pytest.raises(ConfigError, match="benchmark takes a LoadedModel .*got PosixPath; build one with leanlm.load_model"):
        benchmark(tiny_dir)


def test_benchmark_names_the_kernels_of_a_quantized_model(tiny_dir):
    from leanlm import kernels
    from leanlm.models.load import load_model
    from leanlm.quantize import RTNConfig, quantize_

    float_out = benchmark(load_model(tiny_dir, device="cpu"), BenchConfig(prompt_tokens=8, decode_prompt_tokens=4,
                                                                          new_tokens=2, batch=1, repeats=1))
    assert float_out["quant_kernels"] is None  # nothing quantized, nothing to name
    loaded = load_model(tiny_dir, device="cpu")
    quantize_(loaded.model, RTNConfig(bits=8))
    out = benchmark(loaded, BenchConfig(prompt_tokens=8, decode_prompt_tokens=4, new_tokens=2, batch=1, repeats=1))
    assert out["quant_kernels"] == kernels.kernel_status()
