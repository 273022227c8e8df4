import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanlm.core.packed import parameter_count
from leanlm.errors import ConfigError
from leanlm.kernels.sparse24_ops import (
    compress_24,
    compressed_bytes,
    decompress_24,
    expand_words,
    violations_24,
)
from leanlm.models.load import load_model
from leanlm.models.save import save_model
from leanlm.pipeline.recipe import parse_recipe
from leanlm.prune import MagnitudeConfig, prune_
from leanlm.prune.prune_ops import magnitude_mask
from leanlm.sparsify import Sparse24Config, Sparse24Linear, sparse24_
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def two_of_four(rows=12, cols=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w = w.masked_fill(magnitude_mask(w, 0.5, (2, 4)), 0)
    w[0, :8] = 0
    w[1, 4:8] = torch.tensor([0.0, 0.0, 2.0, 0.0])
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_round_trip_is_exact_and_half_the_bytes(dtype):
    w = two_of_four(dtype=dtype)
    values, meta = compress_24(w)
    assert values.shape == (12, 32) and meta.shape == (12, 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta), w)
    dense_bytes = w.numel() * w.element_size()
    assert compressed_bytes(values, meta) == dense_bytes // 2 + w.numel() // 8


def test_the_kernels_word_expansion_gives_every_pattern():
    """The flags turn each group's 32-bit word into its two output words, for all 6 position pairs and
    for groups with fewer nonzeros: the math `kernels/sparse24.py` does in registers."""
    rows = torch.tensor([[1.5, -2.0, 0, 0], [1.5, 0, -2.0, 0], [1.5, 0, 0, -2.0], [0, 1.5, -2.0, 0],
                         [0, 1.5, 0, -2.0], [0, 0, 1.5, -2.0], [0, 0, 0, 0], [0, 0, 3.0, 0]])
    w = rows.repeat(1, 2).half()
    values, meta = compress_24(w)
    pairs = values.view(torch.int16).to(torch.int64).reshape(8, -1, 2) & 0xFFFF
    words = pairs[..., 0] | pairs[..., 1] << 16
    flags = torch.stack([meta & 15, meta >> 4], -1).reshape(8, -1).to(torch.int64)
    pos01, pos23 = expand_words(words, flags)
    halves = torch.stack([pos01 & 0xFFFF, pos01 >> 16, pos23 & 0xFFFF, pos23 >> 16], -1)
    assert torch.equal(halves.reshape(8, -1).to(torch.int16).view(torch.float16), w)


def test_compress_refuses_what_is_not_2of4():
    w = two_of_four()
    w[3, 0:4] = 1.0
    assert violations_24(w) == 1
    with pytest.raises(ValueError, match="not 2:4: 1 groups"):
        compress_24(w)
    with pytest.raises(ValueError, match="multiple of 8"):
        compress_24(torch.zeros(4, 12))
    with pytest.raises(ValueError, match="do not match"):
        decompress_24(torch.zeros(4, 16), torch.zeros(4, 3, dtype=torch.uint8))


def test_triton_kernel_under_the_interpreter():
    """The GPU kernel's own code, run by Triton's CPU interpreter: tiles, split-K, odd shapes, a whole model."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-m", "tests.sparse24_interpreted"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")


def test_gpu_benchmark_script_runs_on_cpu_under_the_interpreter(tmp_path):
    """`benchmarks/gpu_sparse24.py --smoke`: every code path of the GPU benchmark bar CUDA timing, so a GPU
    session's few minutes are not lost to a bug in the script."""
    pytest.importorskip("triton")
    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_sparse24.py", "--smoke", "--decode", "--layers", "1",
                           "--tokens", "1", "80", "--repeats", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {r["matmul"] for r in report["rows"]} == {"gate/up", "down", "mlp"}
    assert all(r["rel_error"] < 1e-2 for r in report["rows"] if "rel_error" in r)
    assert report["decode"]["conversion"]["layers"] == 7 and report["decode"]["2:4"]["decode_tps"] > 0


@pytest.fixture
def pruned_24(tiny):
    prune_(tiny.model, MagnitudeConfig(pattern="2:4"))
    return tiny


def test_sparse24_keeps_the_pruned_model_and_warns_off_gpu(pruned_24, tmp_path):
    model, ids = pruned_24.model, torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    count = parameter_count(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with pytest.warns(RuntimeWarning, match="no 2:4 kernel"):
        report = sparse24_(model)
    assert report["layers"] == 14 and report["kernel"] == "none (expand per call)"
    assert report["weight_bytes_2of4"] / report["weight_bytes_dense"] == pytest.approx(0.5 + 1 / 32)
    assert isinstance(model.get_submodule("model.layers.1.self_attn.o_proj"), Sparse24Linear)
    assert parameter_count(model) == count
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want)
    save_model(model, pruned_24.tokenizer, tmp_path / "m")
    back = load_model(tmp_path / "m", device="cpu")
    assert isinstance(back.model.get_submodule("model.layers.0.mlp.gate_proj"), Sparse24Linear)
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=ids).logits, want)
    out = back.model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_hf_export_of_a_2of4_model_is_dense_and_keeps_the_dtype(pruned_24, tmp_path):
    from transformers import AutoModelForCausalLM

    from leanlm.export import export

    model = pruned_24.model.half()
    with pytest.warns(RuntimeWarning):
        sparse24_(model)
    save_model(model, pruned_24.tokenizer, tmp_path / "m")
    export(tmp_path / "m", tmp_path / "hf", format="hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    weight = plain.get_submodule("model.layers.0.mlp.down_proj").weight
    assert weight.dtype == torch.float16 and violations_24(weight) == 0 and (weight == 0).float().mean() >= 0.5


def test_gguf_export_of_a_2of4_model_runs_the_pruned_weights(pruned_24, tmp_path):
    from leanlm.export import export

    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = pruned_24.model(input_ids=ids).logits
    with pytest.warns(RuntimeWarning):
        sparse24_(pruned_24.model)
    save_model(pruned_24.model, pruned_24.tokenizer, tmp_path / "m")
    info = export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32", embeddings="f32")
    assert info["tensor_types"] == {"F32": 20}
    back = load_model(tmp_path / "m.gguf", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_sparse24_refuses_dense_layers_and_unknown_keys(tiny):
    with pytest.raises(ConfigError, match=r"14 of 14 selected layers are not 2:4 .*pattern '2:4'"):
        sparse24_(tiny.model)
    with pytest.raises(ConfigError, match="sparse24_: the config must be a Sparse24Config, got MagnitudeConfig"):
        sparse24_(tiny.model, MagnitudeConfig())
    with pytest.raises(ConfigError, match="no linear layer matches"):
        sparse24_(tiny.model, Sparse24Config(targets=["nothing*"]))
    with pytest.raises(ConfigError, match="bogus"):
        parse_recipe({"steps": [{"type": "sparse24", "bogus": 1}]}, "recipe.yaml")


def test_sparse24_refuses_a_width_the_kernel_cannot_tile():
    model = tiny_llama(96, hidden=48)
    prune_(model, MagnitudeConfig(pattern="2:4"))
    with pytest.raises(ConfigError, match="multiples of 32: model.layers.0.self_attn.q_proj \\(48\\)"):
        sparse24_(model)


@pytest.mark.parametrize("capability", [80, 90])
def test_kernel_compiles_for_ampere_and_hopper(capability):
    """Codegen the interpreter cannot check (layouts, tensor-core instructions, register allocation)."""
    pytest.importorskip("triton")
    from leanlm.kernels.sparse24 import candidates, compile_for

    small, large = candidates(16), candidates(512)
    chosen = [small[0], next(c for c in small if c.split_k > 1), next(c for c in small if c.prefetch), large[0],
              small[-1]]
    for dtype in ("fp16", "bf16"):
        for config in chosen:
            ptx = compile_for(config, capability, dtype).asm["ptx"]
            assert "mma" in ptx, f"{config} {dtype}: no tensor-core instruction for sm_{capability}"
        expand = next(c for c in large if c.expand_first)  # the weight expanded for cuBLAS: vector stores
        assert "st.global.v4" in compile_for(expand, capability, dtype).asm["ptx"]


def test_sass_benchmark_counts_the_main_loop(tmp_path):
    """`benchmarks/sass_sparse24.py`: the instruction counts BENCHMARKS.md reports come from real cubins."""
    pytest.importorskip("triton")
    out = tmp_path / "sass.json"
    done = subprocess.run([sys.executable, "benchmarks/sass_sparse24.py", "--arch", "90", "--rows", "16", "--limit", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["swap_ab"] and r["stack_bytes"] == 0 for r in rows)
    # the decode tiles' loop: tensor-core work plus an expansion of a few instructions per weight
    assert all(0 < r["tensor_core_per_weight"] and 2 < r["instructions_per_weight"] < 8 for r in rows)


def test_tuner_drops_a_tile_that_computes_wrong_results(monkeypatch, caplog):
    """A tile that a GPU or compiler gets wrong must not win the timing: each is checked first."""
    pytest.importorskip("triton")
    from leanlm.kernels import sparse24 as kernel

    values, meta = compress_24(two_of_four(rows=32, cols=64, dtype=torch.float16))
    wrong, right = kernel.TileConfig(16, 32, 32), kernel.TileConfig(16, 32, 64)

    def launch(x, values, meta, config):
        y = x.float() @ decompress_24(values, meta).float().T
        return (y * 1.5 if config == wrong else y).to(x.dtype)

    times = iter([1.0, 2.0])  # whichever tile is timed first looks fastest
    monkeypatch.setattr(kernel, "_launch", launch)
    monkeypatch.setattr(kernel.triton.testing, "do_bench", lambda fn, **kwargs: (fn(), next(times))[1])
    with caplog.at_level("WARNING", logger="leanlm.kernels.sparse24"):
        assert kernel.tune(16, values, meta, [wrong, right]) == right
    assert "1 tiles computed wrong results" in caplog.text
    with pytest.raises(RuntimeError, match="0 failed to run, 1 computed wrong"):
        kernel.tune(16, values, meta, [wrong])
