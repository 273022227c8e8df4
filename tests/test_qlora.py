"""QLoRA: LoRA adapters over leanlm's packed int4/int8 layers, merged back by requantization."""

import pytest
import torch
from torch import nn

from leanlm.data.corpus import calibration_samples
from leanlm.errors import ConfigError
from leanlm.finetune import FinetuneConfig, finetune_
from leanlm.finetune.qlora import QLoRALinear, merge_qlora
from leanlm.quantize import quantize_
from leanlm.quantize.int4_linear import Int4Linear
from leanlm.quantize.rtn import RTNConfig
from tests.test_train import TEXT, small_train


def _int4(in_features=64, out_features=32, symmetric=False) -> Int4Linear:
    from leanlm.quantize import rtn_ops

    linear = nn.Linear(in_features, out_features)
    codes, scale, zero = rtn_ops.rtn(linear.weight.data, 4, 32, symmetric)
    return Int4Linear.from_codes(linear, codes, scale, zero, 32)


def test_qlora_layer_starts_at_the_base_and_merges_to_what_it_computes():
    base = _int4()
    layer = QLoRALinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(5, 64, requires_grad=True)
    torch.testing.assert_close(layer(x), base(x.detach()), atol=1e-2, rtol=1e-2)  # B = 0 at init
    layer(x).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0 and x.grad is not None
    assert all(not p.requires_grad for p in base.parameters())
    with torch.no_grad():
        layer.lora_B.normal_()
    # with x requiring grad the base runs on its dequantized weight, the float path the merge reproduces
    torch.testing.assert_close(layer.merged_linear()(x), layer(x), atol=1e-4, rtol=1e-4)
    assert base.quant_scheme() == (4, 32, False) and _int4(symmetric=True).quant_scheme() == (4, 32, True)


def test_qlora_finetune_trains_adapters_only_and_requantizes_on_merge(tiny):
    quantize_(tiny.model, RTNConfig(bits=4, group_size=32, symmetric=False))
    packed = {n: m.qweight.clone() for n, m in tiny.model.named_modules() if isinstance(m, Int4Linear)}
    config = FinetuneConfig(rank=4, alpha=8, dropout=0.0, merge=False, train=small_train())
    model, stats = finetune_(tiny.model, tiny.tokenizer, config, TEXT)
    assert stats["best_validation_loss"] < stats["history"][0]["validation_loss"]
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert len(wrapped) == len(packed) and stats["trainable_params"] == sum(
        m.lora_A.numel() + m.lora_B.numel() for m in wrapped.values())
    assert all(torch.equal(m.base.qweight, packed[n]) for n, m in wrapped.items())  # the packed base never moves

    ids = calibration_samples(tiny.tokenizer, TEXT, 4, 64, seed=1)
    with torch.no_grad():
        trained = model(ids).logits
        for m in wrapped.values():
            m.scaling, saved = 0.0, m.scaling
        untrained = model(ids).logits
        for m in wrapped.values():
            m.scaling = saved
    stats = merge_qlora(model, "gptq", calibration_samples(tiny.tokenizer, TEXT, 8, 64), device="cpu")
    assert stats["layers_requantized"] == len(packed) and stats["fraction_of_bf16"] < 0.35
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == len(packed)
    with torch.no_grad():
        merged = model(ids).logits
    # the requantized model is closer to the trained adapter model than the base it started from
    assert (merged - trained).pow(2).mean() < 0.5 * (untrained - trained).pow(2).mean()


def test_qlora_rtn_merge_needs_no_calibration_data(tiny):
    quantize_(tiny.model, RTNConfig(bits=4, group_size=32))
    config = FinetuneConfig(rank=4, alpha=8, requantize="rtn", train=small_train(steps=3))
    model, stats = finetune_(tiny.model, tiny.tokenizer, config, TEXT)
    assert stats["merge_requantize"] == "rtn" and stats["merge_layers_requantized"] == 14
    assert stats["validation_perplexity_after_merge"] > 1
    assert stats["total_params"] > stats["trainable_params"] + 14 * 64 * 64  # packed weights are counted
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())


def test_qlora_bad_inputs(tiny):
    quantize_(tiny.model, RTNConfig(bits=4, group_size=32, targets=["*.mlp.*"]))
    with pytest.raises(ConfigError, match="full fine-tuning cannot update packed quantized weights"):
        finetune_(tiny.model, tiny.tokenizer, FinetuneConfig(method="full", train=small_train()), TEXT)
    with pytest.raises(ConfigError, match="LoRA targets mix quantized layers"):
        finetune_(tiny.model, tiny.tokenizer, FinetuneConfig(targets=["*proj"], train=small_train()), TEXT)
    with pytest.raises(ConfigError, match="needs calibration data"):
        finetune_(tiny.model, tiny.tokenizer, FinetuneConfig(targets=["*.mlp.*"], train=small_train(steps=1)), TEXT)


def test_finetune_cli_on_a_quantized_model_saves_it_requantized(tiny, tmp_path):
    import json
    import subprocess
    import sys

    from leanlm.models.load import load_model
    from leanlm.models.save import save_model

    quantize_(tiny.model, RTNConfig(bits=4, group_size=32))
    save_model(tiny.model, tiny.tokenizer, tmp_path / "q4")
    base = [sys.executable, "-m", "leanlm", "finetune", str(tmp_path / "q4"), "--rank", "4", "--steps", "2",
            "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "64", "--eval-every", "2",
            "--device", "cpu"]
    proc = subprocess.run([*base, "--requantize", "rtn", "--out", str(tmp_path / "tuned")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "tuned" / "leanlm-train.json").read_text())
    assert report["merge_layers_requantized"] == 14 and "eval_perplexity_after" in report
    back = load_model(tmp_path / "tuned", device="cpu").model
    assert sum(isinstance(m, Int4Linear) for m in back.modules()) == 14
    proc = subprocess.run([*base, "--no-merge", "--out", str(tmp_path / "adapter")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "saving an unmerged adapter over packed layers is not supported" in proc.stderr
    assert not (tmp_path / "adapter").exists()
