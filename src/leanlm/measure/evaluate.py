"""Quality: perplexity, KL divergence and top-1 agreement against a reference, task accuracy, generations.

Perplexity is computed over non-overlapping windows of the whole tokenized text (tail dropped).
KLD and top-1 follow llama.cpp: the reference's full next-token distributions on the same
windows are cached to disk once (see refcache), then each model is compared position by position.
Multiple-choice tasks are scored by the summed log-likelihood of each choice, as
lm-evaluation-harness does (`acc`), plus its length-normalised variant (`acc_norm`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from leanlm.core.structure import check_token_ids
from leanlm.data.corpus import default_corpus, make_windows, tokenize
from leanlm.errors import DataError
from leanlm.measure.refcache import LogitCache, cache_key
from leanlm.models.load import check_loaded
from leanlm.runtime.generate import generate_text

DEFAULT_PROMPTS = [
    "The Python `with` statement",
    "A list comprehension is",
    "To define a class in Python,",
]


@dataclass
class Task:
    question: str
    choices: list[str]
    answer: int


@dataclass
class Reference:
    """A reference model's cached distributions on some windows, plus its generations."""
    cache: LogitCache
    perplexity: float | None = None
    generations: dict[str, str] = field(default_factory=dict)


def eval_windows(tokenizer: Any, text: str, window: int = 512) -> torch.Tensor:
    return make_windows(tokenize(tokenizer, text), window)


def model_identity(loaded) -> str:
    """What makes two reference runs interchangeable: the weights' files, their dtype and device."""
    path = Path(loaded.path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    dtype = next(loaded.model.parameters()).dtype
    return json.dumps([str(path.resolve()), stamp, str(dtype), loaded.device.type])


def prepare_reference(loaded, windows: torch.Tensor, prompts: list[str] | None = None,
                      max_new_tokens: int = 32) -> Reference:
    """Open the reference's cached distributions, computing them first if they are missing."""
    key = cache_key(model_identity(loaded), windows)
    cache = LogitCache.open(key)
    if cache is None:
        vocab = _vocab_size(loaded.model, windows)
        cache = LogitCache.create(key, (windows.shape[0], windows.shape[1] - 1, vocab))
        result = score_windows(loaded.model, windows, record=cache, desc="reference logits")
        cache.finish({"perplexity": result["perplexity"]})
        cache = LogitCache.open(key)
    meta = json.loads((cache.path / "meta.json").read_text())
    gens = {p: generate_text(loaded.model, loaded.tokenizer, p, max_new_tokens) for p in prompts or []}
    return Reference(cache=cache, perplexity=meta.get("perplexity"), generations=gens)


@torch.inference_mode()
def score_windows(model: nn.Module, windows: torch.Tensor, reference: Reference | None = None,
                  record: LogitCache | None = None, desc: str = "evaluating") -> dict:
    """Perplexity over `windows`; with a reference, also mean KLD(reference || model) and top-1."""
    check_token_ids(model, windows, "the evaluation text")
    device = next(model.parameters()).device
    nll, kld, agree, count = 0.0, 0.0, 0, 0
    for i in tqdm(range(windows.shape[0]), desc=desc, unit="window", leave=False):
        ids = windows[i : i + 1].to(device)
        logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        nll += -logprobs.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
        if record is not None:
            record.write(i, logprobs)
        if reference is not None:
            ref_logprobs, ref_top = reference.cache.read(i, device)
            if ref_logprobs.shape[-1] != logprobs.shape[-1]:
                raise DataError(f"the reference scores {ref_logprobs.shape[-1]} tokens per position and this model "
                                f"{logprobs.shape[-1]}: KL divergence needs one vocabulary; compare models that share "
                                "a tokenizer")
            own = logprobs.double()
            own = own - torch.logsumexp(own, dim=-1, keepdim=True)
            kld += (ref_logprobs.exp() * (ref_logprobs - own)).sum().item()
            agree += (logprobs.argmax(-1) == ref_top).sum().item()
    out = {"perplexity": math.exp(nll / count), "tokens": count, "windows": int(windows.shape[0])}
    if reference is not None:
        out.update(kld=kld / count, top1=agree / count)
    return out


def _vocab_size(model: nn.Module, windows: torch.Tensor) -> int:
    with torch.inference_mode():
        return model(input_ids=windows[:1, :2].to(next(model.parameters()).device)).logits.shape[-1]


def load_tasks(path: str | Path) -> list[Task]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    tasks = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            tasks.append(_parse_task(line, f"{path}:{lineno}"))
    if not tasks:
        raise DataError(f"{path}: no tasks (expected JSON lines with question, choices, answer)")
    return tasks


def _parse_task(line: str, where: str) -> Task:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(rec, dict) or not {"question", "choices", "answer"} <= set(rec):
        raise DataError(f"{where}: a task needs 'question' (str), 'choices' (list of str) and 'answer' (index)")
    question, choices, answer = rec["question"], rec["choices"], rec["answer"]
    if not isinstance(question, str):
        raise DataError(f"{where}: 'question' must be a string, got {type(question).__name__}")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices)):
        raise DataError(f"{where}: 'choices' must be a list of at least two non-blank strings")
    # JSON true/false are Python ints; an answer of `true` is a mistake, not index 1
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must be an index into choices (0..{len(choices) - 1}), got {answer!r}")
    return Task(question, choices, answer)


@torch.inference_mode()
def score_tasks(model: nn.Module, tokenizer: Any, tasks: list[Task]) -> dict:
    device = next(model.parameters()).device
    correct = correct_norm = 0
    for task in tqdm(tasks, desc="tasks", unit="task", leave=False):
        scores = [_choice_loglik(model, tokenizer, task.question, c, device) for c in task.choices]
        lls = [s for s, _ in scores]
        norm = [s / max(1, n) for s, n in scores]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == task.answer)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == task.answer)
    return {"task_accuracy": correct / len(tasks), "task_accuracy_norm": correct_norm / len(tasks), "tasks": len(tasks)}


def _choice_loglik(model: nn.Module, tokenizer: Any, question: str, choice: str, device) -> tuple[float, int]:
    """Log-likelihood of ' choice' after the question; trailing context spaces move to the choice."""
    context = question.rstrip(" ")
    continuation = question[len(context):] + " " + choice.lstrip(" ")
    ctx_ids = tokenize(tokenizer, context)
    all_ids = tokenize(tokenizer, context + continuation)
    split = max(1, len(ctx_ids))  # an empty question: the first choice token has no context to score
    ids = all_ids[None].to(device)
    logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(-1, targets[:, None])[:, 0][split - 1 :]
    return picked.sum().item(), len(continuation)


@contextmanager
def tallying(model: nn.Module) -> Iterator[dict]:
    """Layers that skip inputs by a calibrated threshold (activation sparsity) count what they skip while
    the block runs: the sparsity this text reaches, which can differ from the calibration text's.
    Yields a dict that holds `measured_act_sparsity` afterwards (skipped inputs weighted by each
    layer's weight count: the share of those layers' weights a token does not need)."""
    modules = model.modules() if isinstance(model, nn.Module) else []  # llama.cpp runs its own graph
    layers = [m for m in modules if hasattr(m, "tally") and hasattr(m, "in_features")]
    for layer in layers:
        layer.tally = [0, 0]
    found: dict = {}
    try:
        yield found
        sizes = [m.in_features * m.out_features for m in layers if m.tally[1]]
        shares = [m.tally[0] / m.tally[1] for m in layers if m.tally[1]]
        if sizes:
            found["measured_act_sparsity"] = sum(s * f for s, f in zip(sizes, shares)) / sum(sizes)
    finally:
        for layer in layers:
            layer.tally = None


def evaluate(loaded, windows: torch.Tensor | str | None = None, reference: Reference | None = None,
             tasks: list[Task] | None = None, prompts: list[str] | None = None, max_new_tokens: int = 32,
             desc: str = "evaluating") -> dict:
    """All quality metrics of one model on the eval windows, as a flat dict (generations under 'generations').

    `windows`: token ids [n, length] (`eval_windows` builds them), a text to cut into 512-token windows,
    or None for the eval split of the built-in corpus."""
    check_loaded(loaded, "evaluate")
    if windows is None or isinstance(windows, str):
        text = default_corpus().eval if windows is None else windows
        windows = eval_windows(loaded.tokenizer, text)
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        raise DataError(f"evaluate: windows must be a text or token ids, an integer tensor [windows, length]; got "
                        f"{type(windows).__name__}")
    start = time.perf_counter()
    with tallying(loaded.model) as skipped:
        result = score_windows(loaded.model, windows, reference=reference, desc=desc)
    result.update(skipped)
    if tasks:
        result.update(score_tasks(loaded.model, loaded.tokenizer, tasks))
    result["generations"] = {p: generate_text(loaded.model, loaded.tokenizer, p, max_new_tokens) for p in prompts or []}
    result["eval_seconds"] = time.perf_counter() - start
    return result
