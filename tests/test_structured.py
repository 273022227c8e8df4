"""Depth and width pruning: a smaller model that plain transformers (and llama.cpp, through GGUF) loads."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from leanlm.core.anatomy import ffn_width, find_ffn
from leanlm.core.structure import find_structure
from leanlm.data.corpus import calibration_samples, default_corpus
from leanlm.errors import ConfigError, UnsupportedModelError
from leanlm.export import export
from leanlm.models.save import save_model
from leanlm.pipeline.recipe import parse_recipe
from leanlm.prune import DepthConfig, HeadsConfig, WidthConfig, prune_, structured_ops
from leanlm.prune.depth import remove_blocks
from tests.conftest import tiny_llama

IDS = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.fixture
def calibration(tokenizer):
    return calibration_samples(tokenizer, default_corpus().train, 8, 64, 0)


def test_block_choice_finds_the_block_that_does_nothing():
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(256, 32, generator=g)]
    for i in range(5):  # block 2 leaves the stream unchanged; the others rewrite part of it
        hidden.append(hidden[-1] if i == 2 else hidden[-1] + 0.8 * torch.randn(256, 32, generator=g))
    assert structured_ops.block_influence(hidden)[2] < 1e-6
    assert structured_ops.blocks_to_remove(hidden, 1, "block_influence") == [2]
    assert structured_ops.blocks_to_remove(hidden, 2, "angular") in ([1, 2], [2, 3])


def test_refit_recovers_a_channel_the_kept_ones_can_express():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    x = torch.cat([x, 2 * x[:, :1] + x[:, 1:2] - x[:, 2:3]], 1)  # channel 8 is a mix of channels 0-2
    w = torch.randn(6, 9, generator=g)
    kept = torch.arange(8)
    refit = structured_ops.refit_down(w, x.T @ x, kept, damp=1e-8)
    torch.testing.assert_close(x[:, kept] @ refit.T, x @ w.T, atol=1e-3, rtol=1e-3)


def test_remove_blocks_equals_skipping_them_and_stays_a_valid_hf_model(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer), layers=4)
    blocks = find_structure(model).blocks
    handles = [blocks[i].register_forward_hook(lambda m, a, out: (a[0],) + tuple(out[1:])
                                               if isinstance(out, tuple) else a[0]) for i in (1, 2)]
    expected = logits(model)
    for h in handles:
        h.remove()
    remove_blocks(model, [1, 2])
    assert model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in find_structure(model).blocks] == [0, 1]
    torch.testing.assert_close(logits(model), expected)
    save_model(model, tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert plain.config.num_hidden_layers == 2
    out = plain.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False)  # the KV cache indexes blocks by layer_idx
    ref = IDS[:1, :8]
    for _ in range(6):
        ref = torch.cat([ref, plain(input_ids=ref).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", ["angular", "block_influence"])
def test_depth_step_removes_blocks_and_reports_scores(tokenizer, calibration, method):
    model = tiny_llama(len(tokenizer), layers=5)
    stats = prune_(model, DepthConfig(blocks=2, method=method, tokens=256), calibration=calibration)
    assert len(stats["removed_blocks"]) == 2 and 4 not in stats["removed_blocks"]
    assert stats["blocks_after"] == 3 == len(find_structure(model).blocks) == model.config.num_hidden_layers
    assert len(stats["block_influence"]) == 5 and stats["params_after"] < stats["params_before"]
    if method == "angular":
        assert stats["removed_blocks"][1] == stats["removed_blocks"][0] + 1


def test_depth_refuses_removing_too_many_blocks(tokenizer, calibration):
    model = tiny_llama(len(tokenizer), layers=3)
    with pytest.raises(ConfigError, match="cannot remove 3 of the model.s 3 blocks"):
        prune_(model, DepthConfig(blocks=3, keep_last=False), calibration=calibration)
    with pytest.raises(ConfigError, match="the last block is kept"):
        prune_(model, DepthConfig(blocks=2), calibration=calibration)
    with pytest.raises(ConfigError, match="blocks must be at least 1"):
        parse_recipe({"steps": [{"type": "depth", "blocks": 0}]})
    with pytest.raises(ConfigError, match="block indices must be in 0..2"):
        remove_blocks(model, [5])


@pytest.mark.parametrize("refit", [True, False])
def test_width_pruning_gives_a_smaller_hf_model(tokenizer, calibration, tmp_path, refit):
    model = tiny_llama(len(tokenizer), layers=2)
    stats = prune_(model, WidthConfig(ffn_keep=0.5, multiple_of=16, refit=refit), calibration=calibration)
    assert stats["intermediate_after"] == 64 == model.config.intermediate_size
    assert stats["max_slice_diff"] < 1e-4
    save_model(model, tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert all(m.out_features == 64 for n, m in plain.named_modules() if n.endswith(("gate_proj", "up_proj")))
    torch.testing.assert_close(logits(plain), logits(model))


def test_refit_brings_the_pruned_model_closer_to_the_original(tokenizer, calibration):
    held_out = calibration_samples(tokenizer, default_corpus().train, 8, 64, seed=1)
    with torch.no_grad():
        ref = tiny_llama(len(tokenizer), layers=2)(input_ids=held_out).logits
    errors = {}
    for refit in (True, False):
        model = tiny_llama(len(tokenizer), layers=2)
        prune_(model, WidthConfig(ffn_keep=0.5, multiple_of=16, refit=refit), calibration=calibration)
        with torch.no_grad():
            errors[refit] = (model(input_ids=held_out).logits - ref).pow(2).mean().item()
    assert errors[True] < errors[False]


def test_width_bad_inputs(tokenizer, calibration):
    with pytest.raises(ConfigError, match=r"ffn_keep must be in \(0, 1\)"):
        parse_recipe({"steps": [{"type": "width", "ffn_keep": 1.2}]})
    with pytest.raises(ConfigError, match="removes nothing"):
        prune_(tiny_llama(len(tokenizer)), WidthConfig(ffn_keep=0.9, multiple_of=64), calibration=calibration)
    with pytest.warns(UserWarning, match=r"keeping 64 of 128 FFN channels \(50%\), not the 25% asked, .* multiples of 64"):
        prune_(tiny_llama(len(tokenizer)), WidthConfig(ffn_keep=0.25, multiple_of=64), calibration=calibration)
    with pytest.raises(ConfigError, match=r"prune_: the model must be a torch nn.Module .*got str"):
        prune_("HuggingFaceTB/SmolLM2-135M", WidthConfig(), calibration=calibration)
    block = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(UnsupportedModelError, match="looked for nn.Linear layers 8 -> 32"):
        find_ffn(block, 8, 32)
    with pytest.raises(UnsupportedModelError, match=r"no intermediate_size and Sequential's module graph shows no FFN"):
        ffn_width(block, 8, "width pruning")


def test_depth_pruned_model_exports_to_gguf(tokenizer, tmp_path):
    from leanlm.models.load import load_model

    model = tiny_llama(len(tokenizer), layers=3)
    remove_blocks(model, [1])
    save_model(model, tokenizer, tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32", embeddings="f32")
    back = load_model(tmp_path / "m.gguf", device="cpu")
    assert back.model.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(back.model), logits(model), atol=1e-4, rtol=1e-4)


def test_skipping_a_block_in_the_scan_equals_removing_it(tokenizer):
    from leanlm.pipeline.scan import skipped

    model = tiny_llama(len(tokenizer), layers=3)
    with skipped(find_structure(model).blocks[1]):
        expected = logits(model)
    before = logits(model)
    remove_blocks(model, [1])
    torch.testing.assert_close(logits(model), expected)
    assert not torch.allclose(before, expected)


@pytest.mark.parametrize("unit,count", [("block", 2), ("layer", 14)])
def test_scan_cli_writes_table_chart_and_json(tiny_dir, tmp_path, capsys, unit, count):
    import json

    from leanlm.cli import main

    out = tmp_path / "scan"
    assert main(["scan", str(tiny_dir), "--unit", unit, "--windows", "1", "--out", str(out)]) == 0
    data = json.loads((out / "scan.json").read_text())
    assert len(data["rows"]) == count and all(r["kld"] > 0 for r in data["rows"])
    assert (out / "scan.png").stat().st_size > 1000 and "| rank |" in (out / "scan.md").read_text()
    assert "most sensitive" in capsys.readouterr().out
    assert main(["scan", str(tiny_dir), "--out", str(out)]) == 2  # exists, no --overwrite
    assert main(["scan", str(tiny_dir), "--unit", "layer", "--sparsity", "1.5", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("keep", [{"heads_per_group": 1}, {"kv_groups": 1}])
def test_head_pruning_gives_a_smaller_hf_model_that_exports(tokenizer, calibration, tmp_path, keep):
    from leanlm.models.load import load_model

    model = tiny_llama(len(tokenizer), layers=2)  # 4 query heads in 2 KV groups, head_dim 16
    stats = prune_(model, HeadsConfig(**keep), calibration=calibration)
    assert (stats["heads_after"], stats["kv_heads_after"]) == ((2, 2) if "heads_per_group" in keep else (2, 1))
    assert stats["max_slice_diff"] < 1e-4 and stats["params_after"] < stats["params_before"]
    save_model(model, tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert plain.config.head_dim == 16 and plain.model.layers[0].self_attn.q_proj.out_features == 32
    torch.testing.assert_close(logits(plain), logits(model))
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32", embeddings="f32")
    back = load_model(tmp_path / "m.gguf", device="cpu")
    torch.testing.assert_close(logits(back.model), logits(model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep", [{"heads_per_group": 1}, {"kv_groups": 1}])
def test_head_pruning_slices_a_fused_qkv_projection(tokenizer, calibration, tmp_path, keep):
    """Phi-3: one qkv_proj (rows q, k, v) and an attention that reads the head count from the config as
    it runs, so blocks pruned before the others must already compute with the new count."""
    model = family_model("phi3")  # 4 query heads in 2 KV groups, head_dim 16
    stats = prune_(model, HeadsConfig(**keep), calibration=calibration)
    heads, kv = (2, 2) if "heads_per_group" in keep else (2, 1)
    assert (stats["heads_after"], stats["kv_heads_after"]) == (heads, kv) and stats["max_slice_diff"] < 1e-4
    attn = model.model.layers[1].self_attn
    assert attn.config is model.config and attn.qkv_proj.out_features == (heads + 2 * kv) * 16
    save_model(model, tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert plain.model.layers[0].self_attn.o_proj.in_features == heads * 16
    torch.testing.assert_close(logits(plain), logits(model))


def test_head_importance_prefers_the_heads_that_reach_the_output(tokenizer, calibration):

    model = tiny_llama(len(tokenizer), layers=2)
    with torch.no_grad():  # head 1 of every block writes nothing to the residual stream
        for block in model.model.layers:
            block.self_attn.o_proj.weight[:, 16:32] = 0
    stats = prune_(model, HeadsConfig(heads_per_group=1), calibration=calibration)
    assert all(kept[0] == 0 for kept in stats["kept_heads"])


def test_head_pruning_bad_inputs(tokenizer, calibration):

    with pytest.raises(ConfigError, match="needs kv_groups and/or heads_per_group"):
        parse_recipe({"steps": [{"type": "heads"}]})
    with pytest.raises(ConfigError, match="cannot keep 3 groups of 2"):
        prune_(tiny_llama(len(tokenizer)), HeadsConfig(kv_groups=3), calibration=calibration)
    with pytest.raises(ConfigError, match="removes nothing"):
        prune_(tiny_llama(len(tokenizer)), HeadsConfig(kv_groups=2, heads_per_group=2), calibration=calibration)
    with pytest.raises(ConfigError, match="each KV group has one query head here: set kv_groups"):
        prune_(mha_model("gpt_neox"), HeadsConfig(heads_per_group=1), calibration=calibration)
    not_an_lm = nn.Sequential(nn.Embedding(320, 8), nn.Linear(8, 8))
    with pytest.raises(UnsupportedModelError, match="no integer num_attention_heads and hidden_size; head pruning needs"):
        prune_(not_an_lm, HeadsConfig(kv_groups=1), calibration=calibration)


def family_model(name: str, **extra):
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(name, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=0,
                                  eos_token_id=0, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family,extra", [("gemma2", {"head_dim": 16}), ("phi3", {})])
def test_width_pruning_on_other_families(tokenizer, calibration, tmp_path, family, extra):
    """Gemma-2 (GeGLU, extra norms) and Phi-3, whose gate and up are one fused linear and whose fused
    qkv (64 -> 64 + 2 x 32 = 128) has the FFN's shape here: it must not be taken for the FFN."""
    model = family_model(family, **extra)
    prune_(model, WidthConfig(ffn_keep=0.5, multiple_of=16), calibration=calibration)
    save_model(model, tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert plain.config.intermediate_size == 64
    torch.testing.assert_close(logits(plain), logits(model))
    if family == "phi3":
        assert plain.model.layers[0].mlp.gate_up_proj.out_features == 128
        assert plain.model.layers[0].self_attn.qkv_proj.out_features == 128


@pytest.mark.parametrize("family,message", [
    ("olmo2", r"self_attn\.q_norm\.weight \(\[64\]\) spans all heads"),  # q/k norms over all heads at once
    ("stablelm", r"2 query heads in 2 KV groups, head_dim 16, has no 64 -> 32 query and 32 -> 64 output"),  # head_dim =
    ("gpt_neox", r"1 query heads in 1 KV groups, head_dim 16, has no 64 -> 16 query"),  # hidden_size / heads, whatever
    ("gpt2", r"1 query heads in 1 KV groups, head_dim 16, has no 64 -> 16 query"),  # head_dim says (refused before
    ("opt", r"1 query heads in 1 KV groups, head_dim 16, has no 64 -> 16 query"),  # calibration starts)
])
def test_head_pruning_refuses_what_it_cannot_keep_valid(calibration, family, message):
    from leanlm.core.conv1d import linearize

    model = family_model(family) if family in ("olmo2", "stablelm") else mha_model(family)
    linearize(model)
    keep = HeadsConfig(heads_per_group=1) if family in ("olmo2", "stablelm") else HeadsConfig(kv_groups=1)
    with pytest.raises(UnsupportedModelError, match=message):
        prune_(model, keep, calibration=calibration)


def mha_model(family: str):
    """A tiny GPT-NeoX, GPT-2 or OPT: one query head per KV group, head size hidden_size / heads."""
    from transformers import AutoConfig

    sizes = {"gpt2": dict(n_embd=64, n_layer=2, n_head=4), "gpt_neox": dict(hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=128), "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
             num_attention_heads=4, word_embed_proj_dim=64)}[family]
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=320, **sizes)).eval()


@pytest.mark.parametrize("family,config,key,width", [
    ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256), "n_inner", 128),  # n_inner unset: 4 x 64
    ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
     "ffn_dim", 64),
])
def test_width_pruning_finds_the_ffn_width_key_of_configs_without_intermediate_size(
        tokenizer, calibration, tmp_path, family, config, key, width):
    from transformers import AutoConfig

    from leanlm.core.conv1d import linearize

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=320, **config)).eval()
    linearize(model)  # as load_model does: GPT-2's Conv1D layers become nn.Linear
    stats = prune_(model, WidthConfig(ffn_keep=0.5, multiple_of=16), calibration=calibration)
    assert stats["intermediate_after"] == width == getattr(model.config, key)
    save_model(model, tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(plain), logits(model))
