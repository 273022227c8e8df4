"""`--speculative lookup|draft:MODEL`: parsing the mode and building its drafter, with the checks that
keep speculation lossless and worth running."""

from __future__ import annotations

import warnings

from leanlm.core.packed import parameter_count
from leanlm.errors import ConfigError
from leanlm.speculate.drafters import DraftModel, PromptLookup

MODES = ("lookup, lookup:N (longest n-gram N, default 3), draft:MODEL (a model sharing the target's tokenizer), "
         "self:DIR (the target's first blocks and the exit head `leanlm distill --exit-layer K` saved in DIR), "
         "self:K (the first K blocks through the model's own final norm and LM head, untrained)")


def make_drafter(spec: str, target, device: str = "auto", dtype: str = "auto"):
    """The drafter for a mode string; `target` is the LoadedModel it drafts for."""
    kind, _, arg = spec.partition(":")
    if kind == "lookup":
        if arg and not arg.isdigit():
            raise ConfigError(f"--speculative {spec}: lookup:N takes the longest n-gram length, got {arg!r}")
        return PromptLookup(max_ngram=int(arg) if arg else 3)
    if kind == "draft":
        if not arg:
            raise ConfigError("--speculative draft:MODEL needs the draft model, e.g. draft:out/int8 (a model leanlm "
                              "made from the target) or a Hugging Face directory sharing the target's tokenizer")
        from leanlm.models.load import load_model

        draft = load_model(arg, device, dtype)
        check_draft(draft, target, arg)
        return DraftModel(draft.model)
    if kind == "self":
        return self_drafter(arg, target)
    raise ConfigError(f"unknown speculative mode {spec!r}; valid: {MODES}")


def self_drafter(arg: str, target):
    """`self:DIR` with a trained exit head, or `self:K` reading block K through the model's own head."""
    from leanlm.speculate.exit_head import ExitHead, load_exit_head
    from leanlm.speculate.self_draft import SelfDraft
    from leanlm.speculate.split import LayerSplit

    if not arg:
        raise ConfigError("--speculative self:DIR needs an exit head (train one with `leanlm distill --exit-layer K "
                          "MODEL --out DIR`), or self:K for the first K blocks through the model's own head")
    if arg.isdigit():
        split = LayerSplit(target.model, int(arg))
        warnings.warn(f"self:{arg} reads block {arg} through the model's own final norm and LM head, which a model "
                      "trained without early-exit losses rarely agrees with: expect few accepted drafts; train an "
                      "exit head with `leanlm distill --exit-layer K` and pass self:DIR", stacklevel=2)
        return SelfDraft(split, ExitHead(split.norm, target.model.config.hidden_size, 0).eval())
    head, split = load_exit_head(arg, target.model)
    return SelfDraft(split, head)


def check_draft(draft, target, name: str) -> None:
    """Refuse a drafter whose token ids mean other things; warn about one that cannot pay for itself."""
    d_vocab = draft.model.get_input_embeddings().num_embeddings
    t_vocab = target.model.get_input_embeddings().num_embeddings
    if d_vocab != t_vocab:
        raise ConfigError(f"draft model {name} has a {d_vocab}-token vocabulary, the target {t_vocab}: their token "
                          "ids do not mean the same text, so its drafts cannot be verified; use a drafter made from "
                          "the target (leanlm optimize/distill) or one sharing its tokenizer")
    d_tok, t_tok = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    if d_tok != t_tok:
        differ = sorted(set(d_tok.items()) ^ set(t_tok.items()))[:3]
        raise ConfigError(f"draft model {name}'s tokenizer differs from the target's (e.g. {differ}); speculation "
                          "needs the same token ids for the same text")
    d_params, t_params = parameter_count(draft.model), parameter_count(target.model)
    if d_params > t_params:
        warnings.warn(f"draft model {name} has {d_params / 1e6:.0f}M parameters, more than the target's "
                      f"{t_params / 1e6:.0f}M: each drafted token costs about as much as a verified one, so "
                      "speculation cannot pay; use a smaller or quantized drafter", stacklevel=2)
