"""The compiled static-cache decode loop must produce what the eager loop produces, for float and packed layers."""

import pytest
import torch

from leanlm.measure.bench import BenchConfig, benchmark
from leanlm.quantize import RTNConfig, quantize_
from leanlm.quantize.int4_linear import Int4Linear
from leanlm.runtime.compiled_decode import CompiledDecoder
from leanlm.runtime.generate import decode_one_token, new_cache, prefill

from .conftest import tiny_llama


def _logits(prefill_fn, step_fn, cache, ids, steps: int) -> torch.Tensor:
    logits = [prefill_fn(ids, cache)]
    for _ in range(steps):
        logits.append(step_fn(logits[-1].argmax(-1, keepdim=True), cache))
    return torch.stack(logits, 1)


def _sharp_model():
    model = tiny_llama(256, hidden=128)
    with torch.no_grad():  # larger weights give peaked distributions, so greedy paths differ between positions
        for p in model.parameters():
            p.mul_(8)
    return model


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_compiled_decode_matches_eager(bits):
    model = _sharp_model()
    if bits == 4:
        quantize_(model, RTNConfig(bits=bits, group_size=64, symmetric=False))
        assert any(isinstance(m, Int4Linear) for m in model.modules())
    elif bits == 8:  # per channel, symmetric: the layout leanlm's int8 decode kernel reads
        quantize_(model, RTNConfig(bits=bits))
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    want = _logits(lambda i, c: prefill(model, i, c), lambda t, c: decode_one_token(model, t, c), new_cache(model), ids, 8)
    decoder = CompiledDecoder(model, max_len=16)
    for _ in range(2):  # the second pass reuses the emptied cache and the compiled step
        got = _logits(decoder.prefill, decoder.decode_one_token, decoder.new_cache(1), ids, 8)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=0)


def test_compiled_decoder_switches_batch_sizes_correctly():
    """Guards are skipped once a batch size has its graph; a new size must still get its own graph."""
    model = _sharp_model()
    decoder = CompiledDecoder(model, max_len=16)
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2, 1, 2):
        ids = torch.randint(0, 256, (batch, 5), generator=gen)
        want = _logits(lambda i, c: prefill(model, i, c), lambda t, c: decode_one_token(model, t, c),
                       new_cache(model), ids, 4)
        for _ in range(2):
            got = _logits(decoder.prefill, decoder.decode_one_token, decoder.new_cache(batch), ids, 4)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=0)


def test_compiled_decoder_refuses_a_prompt_that_fills_the_cache():
    decoder = CompiledDecoder(tiny_llama(256), max_len=8)
    with pytest.raises(ValueError, match="no room"):
        decoder.prefill(torch.zeros(1, 8, dtype=torch.long), decoder.new_cache(1))


def test_benchmark_with_the_compiled_loop(tiny):
    cfg = BenchConfig(prompt_tokens=16, decode_prompt_tokens=8, new_tokens=4, batch=1, repeats=1, warmup=1, compile=True)
    out = benchmark(tiny, cfg)
    assert out["decode_tps"] > 0 and out["decode_tps_batch"] == out["decode_tps"]
    assert out["config"]["compile"] is True


def _act_sparse(model, calibration):
    from leanlm.sparsify import ActSparsityConfig, sparsify_activations_

    sparsify_activations_(model, ActSparsityConfig(sparsity=0.3, rows=128), calibration)


def _moefy(model, calibration):
    from leanlm.sparsify import MoefyConfig, moefy_

    moefy_(model, MoefyConfig(experts=8, shared=2, top_k=2, rows=128), calibration)


def _w8a8(model, calibration):
    from leanlm.quantize import SmoothQuantConfig

    quantize_(model, SmoothQuantConfig(search_samples=4, batch_size=4), calibration=calibration)


@pytest.mark.parametrize("transform", [_act_sparse, _moefy, _w8a8], ids=["act_sparse", "moefy", "w8a8"])
def test_modules_with_host_side_paths_compile_and_match_eager(tiny, tokenizer, transform):
    """Their batch-1 paths read data-dependent sizes or cache on the host; compiled, they must take
    the static path and still give the eager loop's logits."""
    from leanlm.data.corpus import calibration_samples, default_corpus

    transform(tiny.model, calibration_samples(tokenizer, default_corpus().train, 4, 64, 0))
    ids = torch.randint(0, tiny.model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    model = tiny.model
    want = _logits(lambda i, c: prefill(model, i, c), lambda t, c: decode_one_token(model, t, c), new_cache(model), ids, 5)
    decoder = CompiledDecoder(model, max_len=16)
    got = _logits(decoder.prefill, decoder.decode_one_token, decoder.new_cache(1), ids, 5)
    torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=0)
