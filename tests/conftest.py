"""Fixtures: tiny random models built in the test (no downloads) and an isolated leanlm cache."""

from __future__ import annotations

import pytest
import torch

from leanlm.data.corpus import default_corpus


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    # Real-model tests share the user's cache so the converted model is reused; the rest get a fresh one.
    if "slow" not in request.keywords:
        monkeypatch.setenv("LEANLM_CACHE", str(tmp_path_factory.mktemp("cache")))


def build_tokenizer(vocab_size: int = 320, split: str | None = None):
    """A byte-level BPE trained on the corpus; `split` is a regex that pre-splits the text as Llama 3's
    and Qwen's tokenizers do (then, as theirs, it ignores merges for words already in the vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, ignore_merges=split is not None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = byte_level if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([default_corpus().train[:60_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_spm_tokenizer(vocab_size: int = 600, metaspace: bool = False):
    """A SentencePiece-style BPE as Llama 2's tokenizer.json has it: byte fallback, "▁" for spaces put in by
    the normalizer (or, as newer conversions do, by a Metaspace pre-tokenizer), and BOS added."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # while training: pieces stay within words
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([default_corpus().train[:60_000]],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    if metaspace:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    else:
        tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama saved as a Hugging Face directory, with a BPE tokenizer trained on the corpus."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny(tiny_dir):
    from leanlm.models.load import load_model

    return load_model(tiny_dir, device="cpu")
