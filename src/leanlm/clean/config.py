"""The cleaning stages' typed configs, in the order they run. A YAML file (`--config clean.yaml`) holds a
mapping of stage name -> options; an unknown stage or option, or a threshold outside [0, 1], is refused
with the valid names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from leanlm.core.config import Validated, parse_config
from leanlm.errors import ConfigError


def _unit(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{type(obj).__name__}.{name} = {value} is outside [0, 1]")


@dataclass
class ExactConfig(Validated):
    """Records equal after normalization (NFKC, case-folded, whitespace collapsed): the first is kept."""
    enabled: bool = True


@dataclass
class NearConfig(Validated):
    """MinHash LSH finds candidates; each is kept only if its exact similarity clears `threshold`.

    Word 5-grams at Jaccard 0.8 (the usual setting) miss most realistic near-copies: deleting or swapping
    one word in ten changes about half of a text's 5-grams. On the planted benchmark (benchmarks/clean_dedup.py)
    the Jaccard of word sets without stopwords kept 98% of such copies above 0.62, while two unrelated chunks of
    the same manual have a median of 0.02 (99th percentile 0.12); bigrams and trigrams separated copies from
    neighbours worse. 32 bands of 5 rows make a pair at 0.6 a candidate with probability 0.94 and one at 0.1
    with 3e-4, so candidates grow with the copies, not with the square of the records. Texts shorter than
    `min_words` are left to the exact stage: a handful of words says too little to call two texts copies."""
    enabled: bool = True
    ngram: int = 1
    measure: Literal["jaccard", "containment"] = "jaccard"
    threshold: float = 0.6
    drop_stopwords: bool = True
    num_perm: int = 160
    bands: int = 32
    min_words: int = 8
    seed: int = 42

    def validate(self) -> None:
        _unit(self, "threshold")
        if self.ngram < 1 or self.num_perm < 1 or self.bands < 1 or self.num_perm % self.bands:
            raise ConfigError(f"near_duplicates needs ngram >= 1 and bands dividing num_perm, got ngram {self.ngram}, "
                              f"num_perm {self.num_perm}, bands {self.bands}")


@dataclass
class SemanticConfig(Validated):
    """Off by default: it embeds every record, which is far slower than the word-level stages. Records whose
    all-MiniLM-L6-v2 embeddings have a cosine of at least `threshold` are duplicates; the first is kept.
    Clusters of about `cluster_size` records (SemDeDup's k-means) bound the comparisons. The default
    threshold comes from benchmarks/clean_semantic.py (paraphrased copies of the manual's chunks against
    distinct chunks of the same manual; chosen on its first seed): at 0.85, 95% of the paraphrases went at
    97.5% precision; at 0.8 precision fell to 90%, at 0.9 recall to 92%."""
    enabled: bool = False
    threshold: float = 0.85
    min_words: int = 8
    cluster_size: int = 1000
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        _unit(self, "threshold")
        if self.cluster_size < 2 or self.batch_size < 1 or self.min_words < 0:
            raise ConfigError(f"semantic_duplicates needs cluster_size >= 2, batch_size >= 1 and min_words >= 0, got "
                              f"{self.cluster_size}, {self.batch_size}, {self.min_words}")


@dataclass
class QualityConfig(Validated):
    """Gopher-style heuristics. Defaults are set so that chat examples and code-bearing documentation pass
    (Gopher's own 50-word minimum would drop most fine-tuning examples)."""
    enabled: bool = True
    min_words: int = 1
    max_words: int = 100_000
    min_mean_word_length: float = 1.5
    max_mean_word_length: float = 15.0
    max_symbol_ratio: float = 0.5
    min_alpha_word_ratio: float = 0.3
    max_duplicate_line_ratio: float = 0.5
    max_top_ngram_ratio: float = 0.5

    def validate(self) -> None:
        _unit(self, "max_symbol_ratio", "min_alpha_word_ratio", "max_duplicate_line_ratio", "max_top_ngram_ratio")


@dataclass
class ConflictConfig(Validated):
    """Chat or prompt/completion records whose prompts are the same (or word-bigram Jaccard >= `prompt_similarity`)
    and whose answers disagree: a substituted content word or number, or a negation added or removed."""
    enabled: bool = True
    policy: Literal["flag", "majority", "drop"] = "majority"
    prompt_similarity: float = 0.8

    def validate(self) -> None:
        _unit(self, "prompt_similarity")


@dataclass
class PIIConfig(Validated):
    enabled: bool = True
    kinds: list[Literal["email", "phone", "ip", "card", "secret"]] = field(
        default_factory=lambda: ["email", "phone", "ip", "card", "secret"])


@dataclass
class ContaminationConfig(Validated):
    """Records sharing a word n-gram with any of `eval_files` (the GPT-3 paper's 13-gram test) are removed."""
    eval_files: list[str] = field(default_factory=list)
    ngram: int = 13

    def validate(self) -> None:
        if self.ngram < 1:
            raise ConfigError(f"contamination.ngram must be >= 1, got {self.ngram}")


@dataclass
class CleanConfig(Validated):
    exact_duplicates: ExactConfig = field(default_factory=ExactConfig)
    near_duplicates: NearConfig = field(default_factory=NearConfig)
    semantic_duplicates: SemanticConfig = field(default_factory=SemanticConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    conflicts: ConflictConfig = field(default_factory=ConflictConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)


def load_config(source: str | Path | dict | None) -> CleanConfig:
    if source is None:
        return CleanConfig()
    if isinstance(source, dict):
        return parse_config(CleanConfig, source, "clean config")
    import yaml

    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"clean config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    return parse_config(CleanConfig, data, str(path))
