"""GPT-2 style Conv1D layers: held as nn.Linear while leanlm works, written back as Conv1D to save."""

import pytest
import torch
from torch import nn

from leanlm.core.conv1d import hf_layout, linearize
from leanlm.errors import UnsupportedModelError
from leanlm.models.load import load_model
from leanlm.models.save import save_model

IDS = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def gpt2_dir(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=96,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).eval().save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_linearized_model_computes_the_same_and_saves_as_gpt2(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    loaded = load_model(gpt2_dir, device="cpu")
    conv = {type(m).__name__ for m in loaded.model.modules()}
    assert "Conv1D" not in conv and "Linear" in conv
    torch.testing.assert_close(logits(loaded.model), logits(plain))
    save_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    assert "Conv1D" not in {type(m).__name__ for m in loaded.model.modules()}  # put back after saving
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    torch.testing.assert_close(logits(again), logits(plain))


def test_hf_layout_finds_conv1d_positions_after_blocks_are_removed(gpt2_dir):
    model = load_model(gpt2_dir, device="cpu").model
    del model.transformer.h[0]
    model.config.n_layer = 1
    with hf_layout(model):
        kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.startswith("transformer.h.0.")}
        assert kinds["transformer.h.0.attn.c_attn"] == "Conv1D" and kinds["transformer.h.0.mlp.c_proj"] == "Conv1D"
    assert isinstance(model.transformer.h[0].attn.c_attn, nn.Linear)


def test_a_model_without_conv1d_is_left_alone(tiny):
    assert linearize(tiny.model) == 0
    before = dict(tiny.model.named_modules())
    with hf_layout(tiny.model):
        assert dict(tiny.model.named_modules()) == before


@pytest.mark.parametrize("recipe", ["quantize", "prune"])
def test_gpt2_quantized_or_pruned_round_trips(gpt2_dir, tmp_path, recipe):
    from leanlm.prune import MagnitudeConfig, prune_
    from leanlm.quantize import RTNConfig, quantize_

    loaded = load_model(gpt2_dir, device="cpu")
    if recipe == "quantize":
        quantize_(loaded.model, RTNConfig(bits=8))
    else:
        prune_(loaded.model, MagnitudeConfig(sparsity=0.5))
    expected = logits(loaded.model)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    back = load_model(tmp_path / "out", device="cpu")
    torch.testing.assert_close(logits(back.model), expected)
    if recipe == "prune":
        weight = back.model.transformer.h[1].mlp.c_fc.weight
        assert weight.shape == (96, 64) and (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_compressed_tensors_refuses_conv1d_models(gpt2_dir, tmp_path):
    from leanlm.export.compressed_tensors_export import export_compressed_tensors
    from leanlm.quantize import RTNConfig, quantize_

    loaded = load_model(gpt2_dir, device="cpu")
    quantize_(loaded.model, RTNConfig(bits=8))
    with pytest.raises(UnsupportedModelError, match="Conv1D.*export --format hf"):
        export_compressed_tensors(loaded.model, loaded.tokenizer, tmp_path / "ct")


def test_hf_export_of_a_quantized_gpt2_loads_in_transformers(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from leanlm.export import export
    from leanlm.quantize import RTNConfig, quantize_

    loaded = load_model(gpt2_dir, device="cpu")
    quantize_(loaded.model, RTNConfig(bits=8))
    expected = logits(loaded.model)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "q")
    export(tmp_path / "q", tmp_path / "hf", "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(plain), expected, atol=1e-4, rtol=1e-4)
