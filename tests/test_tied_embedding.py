"""A tied model whose LM head is quantized to int8 keeps one int8 matrix for both ends: the input embedding
reads the head's codes instead of keeping a float copy. Saved once, loaded back sharing, same logits."""

import torch

from leanlm.core.structure import tied_embedding
from leanlm.core.paths import dir_size
from leanlm.core.step import StepContext, apply_step, parse_step
from leanlm.models.load import load_model
from leanlm.models.save import save_model
from leanlm.quantize.int8_embedding import TiedInt8Embedding
from tests.conftest import tiny_llama


def _quantize(model, tokenizer, **fields):
    step = parse_step({"type": "rtn", "bits": 8, "skip": [], **fields}, "test")
    return apply_step(model, step, StepContext(tokenizer=tokenizer))


def test_a_packed_tied_head_lends_its_codes_to_the_embedding(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer), hidden=128)
    assert tied_embedding(model)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    float_embed = model.get_input_embeddings().weight.detach().clone()
    stats = _quantize(model, tokenizer)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, TiedInt8Embedding) and "tied_embedding" in stats
    assert embed.qweight is head.qweight and embed.scale is head.scale  # the same tensors, not copies
    # each looked-up row is the head's dequantized row: within half a quantization step of the float row
    rows = embed(ids[:1, :5])[0]
    step = head.scale[ids[0, :5]].float()
    assert torch.all((rows - float_embed[ids[0, :5]]).abs() <= step / 2 + 1e-6)
    assert torch.equal(embed.weight, head.dequantized_weight())
    with torch.no_grad():
        logits = model(ids).logits

    untied = tiny_llama(len(tokenizer), hidden=128)
    _quantize(untied, tokenizer, skip=["lm_head"])  # the head (and so the embedding) stays float
    save_model(untied, tokenizer, tmp_path / "float-head")
    save_model(model, tokenizer, tmp_path / "int8-head")
    loaded = load_model(tmp_path / "int8-head", device="cpu").model
    embed, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert isinstance(embed, TiedInt8Embedding) and embed.qweight.data_ptr() == head.qweight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    # one int8 matrix instead of a float32 one: the checkpoint is smaller than the one with a float head
    matrix = len(tokenizer) * 128
    assert dir_size(tmp_path / "int8-head") < dir_size(tmp_path / "float-head") - 2 * matrix


def test_untied_models_and_float_heads_keep_their_embedding(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    untied = LlamaForCausalLM(config).eval()
    _quantize(untied, tokenizer)
    assert isinstance(untied.get_input_embeddings(), torch.nn.Embedding)
    tied = tiny_llama(len(tokenizer))
    _quantize(tied, tokenizer, skip=["lm_head"])
    assert tied_embedding(tied)  # still one float tensor at both ends


def test_exports_write_the_embedding_the_model_computes_with(tiny_dir, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    from leanlm.export import export
    from leanlm.quantize import RTNConfig, quantize_

    loaded = load_model(tiny_dir, device="cpu")
    quantize_(loaded.model, RTNConfig(bits=8, skip=[]))  # the verb API shares the codes too
    assert isinstance(loaded.model.get_input_embeddings(), TiedInt8Embedding)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "q")
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = loaded.model(ids).logits
    export(tmp_path / "q", tmp_path / "hf", "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, atol=2e-2, rtol=0)
    export(tmp_path / "q", tmp_path / "m.gguf", "gguf", embeddings="f32")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # still tied in llama.cpp
    back = load_model(tmp_path / "m.gguf", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids).logits, want, atol=2e-2, rtol=0)


def test_an_int4_head_lends_its_nibbles_too(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from leanlm.export import export
    from leanlm.quantize.int4_embedding import TiedInt4Embedding

    model = tiny_llama(len(tokenizer), hidden=128)
    float_embed = model.get_input_embeddings().weight.detach().clone()
    stats = _quantize(model, tokenizer, bits=4, group_size=32, symmetric=False)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, TiedInt4Embedding) and "tied_embedding" in stats
    assert embed.qweight is head.qweight and embed.zero is head.zero
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    rows = embed(ids)
    assert rows.shape == (2, 24, 128) and rows.dtype == torch.float32
    assert torch.equal(rows[0], head.dequantized_weight()[ids[0]])
    # within half a step of the float rows (scales are float16: a little slack)
    step = head.scale[ids[0]].float().repeat_interleave(32, dim=1)
    assert torch.all((rows[0] - float_embed[ids[0]]).abs() <= step / 2 + 1e-3)
    with torch.no_grad():
        logits = model(ids).logits
    save_model(model, tokenizer, tmp_path / "int4-head")
    loaded = load_model(tmp_path / "int4-head", device="cpu").model
    embed = loaded.get_input_embeddings()
    assert isinstance(embed, TiedInt4Embedding)
    assert embed.qweight.data_ptr() == loaded.get_output_embeddings().qweight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        assert loaded.to(torch.bfloat16).get_input_embeddings()(ids).dtype == torch.bfloat16
    # the int4 matrix replaces a float32 one: far below the float32 embedding alone
    assert dir_size(tmp_path / "int4-head") < 4 * len(tokenizer) * 128
    export(tmp_path / "int4-head", tmp_path / "hf", "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, logits, atol=2e-2, rtol=0)
