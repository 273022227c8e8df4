"""A tokenizer written into a GGUF file the way llama.cpp reads it back.

Two kinds of HF tokenizer.json are written:
- byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen) as llama.cpp's "gpt2" model with its merges, the
  pre-tokenizer named from the split rules (a set llama.cpp has no name for is refused, not guessed:
  a wrong name splits digits, contractions or newlines differently from training);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B, TinyLlama) as llama.cpp's "llama"
  model. That model merges the adjacent pair whose joined piece scores highest, so each piece scores
  minus the rank of the merge that makes it, which replays the HF merges in their order.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import gguf

from leanlm.errors import UnsupportedModelError

log = logging.getLogger(__name__)

# the split rules of tokenizer.json's pre-tokenizers, by the name llama.cpp gives them
_LETTERS_AND = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_THEN = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_RULES = {_LETTERS_AND + r"\p{N}{1,3}" + _THEN: "llama-bpe", _LETTERS_AND + r"\p{N}" + _THEN: "qwen2"}


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's split rules; one it has no name for is an error, not a guess,
    since a wrong name tokenizes digits, contractions or newlines differently from the model's training."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not byte_level:
        raise UnsupportedModelError(f"GGUF export writes byte-level BPE tokenizers; this one pre-tokenizes with {kinds}")
    if byte_level[0].get("add_prefix_space"):
        raise UnsupportedModelError("GGUF export cannot write a tokenizer that adds a prefix space (llama.cpp's BPE "
                                    "does not); export --format hf and use llama.cpp's converter")
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    digits = [p for p in parts if p.get("type") == "Digits"]
    name, own_regex = None, byte_level[0].get("use_regex", True)
    if own_regex and not splits:
        if not digits:
            name = "gpt-2"
        elif len(digits) == 1 and digits[0].get("individual_digits") and kinds[0] == "Digits":
            name = "smollm"
    elif not own_regex and len(splits) == 1 and not digits:
        name = SPLIT_RULES.get(splits[0])
    if name is None or set(kinds) - {"ByteLevel", "Split", "Digits"}:
        raise UnsupportedModelError(f"GGUF export does not know llama.cpp's name for this tokenizer's split rules "
                                    f"({json.dumps(pre)[:300]}); export --format hf and use llama.cpp's converter")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise UnsupportedModelError(f"llama.cpp's BPE does not apply this tokenizer's {normalizer} normalizer")
    return name


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]




def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        if spec.get("model", {}).get("type") != "BPE":
            raise UnsupportedModelError("GGUF export writes BPE tokenizers (byte-level or with byte fallback) only")
        spm = bool(spec["model"].get("byte_fallback"))
        tokens, types = _vocab(tokenizer, vocab_size)
        if spm:
            types = [gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) else
                     gguf.TokenType.UNKNOWN if t == tokenizer.unk_token else k for t, k in zip(tokens, types)]
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_add_space_prefix(_space_prefix(spec))
            writer.add_token_scores(_merge_scores(spec, tokens, types))
        else:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_pre_tokenizer(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=not spm, n_vocab=len(tokens))
        # what the HF tokenizer does, whatever its config files say
        special.add_special_token["bos"] = _adds_bos(tokenizer)
        special.add_to_gguf(writer)


def _space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (llama.cpp's add_space_prefix); other layouts are refused."""
    norm = spec.get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm else []
    kinds = [(n.get("type"), n.get("prepend") or (n.get("pattern") or {}).get("String")) for n in steps]
    pre = spec.get("pre_tokenizer")
    if not pre and kinds in ([("Prepend", "▁"), ("Replace", " ")], [("Replace", " ")]):
        return kinds[0][0] == "Prepend"
    if not steps and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" \
            and not pre.get("split", True) and pre.get("prepend_scheme") in ("first", "always", "never"):
        if pre["prepend_scheme"] != "never":
            log.warning("this tokenizer adds no '▁' before text that already starts with a space, llama.cpp (like "
                        "SentencePiece) always adds one: only such texts tokenize differently in llama.cpp")
        return pre["prepend_scheme"] != "never"
    raise UnsupportedModelError(f"GGUF export cannot write this SentencePiece-style tokenizer (normalizer {kinds}, "
                                f"pre-tokenizer {json.dumps(pre)[:200]}); export --format hf and use llama.cpp's converter")


def _merge_scores(spec: dict, tokens: list[str], types: list[int]) -> list[float]:
    """Minus the rank of the merge that makes each piece; pieces no merge makes never win a pair."""
    ids = {t: i for i, t in enumerate(tokens)}
    scores = [0.0 if types[i] == gguf.TokenType.NORMAL else -1e9 for i in range(len(tokens))]
    made = set()
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        piece = ids.get(left + right)
        if piece is not None and piece not in made:
            made.add(piece)
            scores[piece] = -float(rank)
    for i, t in enumerate(tokens):
        if i not in made and len(t) > 1 and types[i] == gguf.TokenType.NORMAL:
            scores[i] = -1e9  # a multi-character piece no merge makes: HF never produces it by merging
    return scores


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            special = i in added and getattr(added[i], "special", False)
            types.append(gguf.TokenType.CONTROL if special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, types


