"""`leanlm federate`: LoRA fine-tuning across clients that keep their data, on Flower's simulation engine
(clients on Ray, one process per CPU), then the global adapter merged into the base (a quantized base is
requantized, as QLoRA merges are), evaluated on the pooled held-out text and saved like any leanlm model.

Writes OUT/model, OUT/report.json, report.md and chart.png (per-round loss, perplexity and bytes). Rounds
are checkpointed beside OUT (`.OUT.federate/`); `resume=True` continues a stopped run from its last round."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from leanlm.core.config import parse_config, to_dict
from leanlm.core.paths import atomic_dir, check_output
from leanlm.errors import ConfigError
from leanlm.federate.config import FederateConfig, FederateError
from leanlm.federate.data import client_texts
from leanlm.federate.report import write_federate_report
from leanlm.models.builtin import DEFAULT_MODEL

log = logging.getLogger(__name__)


def federate(model: str = DEFAULT_MODEL, out: str | Path = "leanlm-federate", data: list[str] | None = None,
             config: FederateConfig | dict | None = None, resume: bool = False, overwrite: bool = False,
             kill: tuple[int, int] | None = None) -> dict:
    """Run the federated rounds and write OUT; returns the report. `data`: one directory or file per client
    (default: the built-in corpus dealt to `config.clients` clients by `config.split`). `kill=(client, round)`
    kills that client's process in that round (fault injection: the round must go on without it)."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("leanlm federate runs on Flower: pip install 'leanlm[federated]'") from None
    cfg = config if isinstance(config, FederateConfig) else parse_config(FederateConfig, config or {}, "federate config")
    if data:
        cfg.clients = len(data)
        cfg.validate()
    out = Path(out).expanduser()
    texts = client_texts(data, cfg.clients, cfg.split, cfg.holdout)
    settings = to_dict(cfg)
    work = prepare_work(out, {"model": str(model), "data": data, **settings}, resume, overwrite)
    from leanlm.models.load import load_model

    base = load_model(model, "cpu")  # resolves a built-in name to its files once, for every client
    spec = {"base": str(base.path), "settings": settings, "work": str(work), "kill": list(kill) if kill else None,
            "clients": [{"name": t.name, "train": t.train, "holdout": t.holdout} for t in texts]}
    del base
    started = time.perf_counter()
    try:
        _simulate(spec, len(texts))
    except FederateError:
        pass  # the server wrote why; said below with what to do
    state = json.loads((work / "state.json").read_text()) if (work / "state.json").exists() else {"next_round": 1}
    if state["next_round"] <= cfg.rounds:
        raise stopped_error(work, state, cfg.rounds)
    report = _finish(spec, state, model, out, overwrite or resume, time.perf_counter() - started)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _simulate(spec: dict, clients: int) -> None:
    """Flower's simulation engine: the ServerApp in this process, each client a ClientApp on a Ray actor."""
    from flwr.simulation import run_simulation

    from leanlm.federate.apps import client_app, server_app

    cpus = os.cpu_count() or 1
    run_simulation(server_app=server_app(spec), client_app=client_app(spec), num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "log_to_driver": False}})


def prepare_work(out: Path, settings: dict, resume: bool, overwrite: bool) -> Path:
    """The run's checkpoint directory beside OUT: fresh, or (resume) the stopped run's, if its settings match."""
    work = out.parent / f".{out.name}.federate"
    if not resume:
        check_output(out, overwrite)
        shutil.rmtree(work, ignore_errors=True)
    elif not (work / "state.json").exists():
        raise ConfigError(f"--resume: there is no stopped run to continue at {work}")
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "settings.json"
    if resume and json.loads(saved.read_text()) != settings:
        raise ConfigError(f"--resume: the run at {work} used other settings; run it with the same ones, or start "
                          "afresh without --resume")
    saved.write_text(json.dumps(settings))
    return work


def stopped_error(work: Path, state: dict, rounds: int, extra: str = "") -> FederateError:
    error = work / "error.txt"
    why = error.read_text().strip() if error.exists() else "see the log above for the server's error"
    return FederateError(f"the run stopped after round {state['next_round'] - 1} of {rounds}: {why} {extra}".rstrip()
                         + f". Its finished rounds are kept in {work}: fix the cause and run again with --resume")


def _finish(spec: dict, state: dict, model: str, out: Path, overwrite: bool, seconds: float) -> dict:
    """The global adapter merged into the base, evaluated, saved. In simulation (and deployed with server-side
    `eval_text`) the server scores the adapter and the merged model itself; deployed without it, the adapter's
    score is the clients' last federated evaluation and the merged model is not scored (the server holds no
    client text)."""
    import numpy as np

    from leanlm.federate import client as local
    from leanlm.finetune.qlora import merge_qlora
    from leanlm.models.save import save_model

    s = spec["settings"]
    a = local.adapted(spec["base"], s)
    held = _held_out(spec, a.tokenizer)
    before = local.mean_loss(a, held)[0] if held is not None and spec.get("eval_text") else None
    a.load(dict(np.load(Path(spec["work"]) / "adapter.npz")))
    history = state["history"]
    adapter_loss = local.mean_loss(a, held)[0] if held is not None else history[-1]["central_loss"]
    quantized = not hasattr(a.model, "merge_and_unload")
    if quantized:  # requantized by GPTQ, as a QLoRA merge is, calibrated on the built-in corpus' eval split:
        # the server holds no client's training text
        from leanlm.data.corpus import calibration_samples, default_corpus

        merge_qlora(a.model, "gptq", calibration_samples(a.tokenizer, default_corpus().eval, 32, 256))
        merged = a.model
    else:
        merged = a.model.merge_and_unload()
    local._MODELS.clear()
    a.model = merged
    merged_loss = local.mean_loss(a, held)[0] if held is not None else None
    report = {"model": str(model), "settings": s, "clients": _client_names(spec, history),
              "history": history, "seconds": seconds,
              "evaluated_on": ("the server's eval text" if spec.get("eval_text") else "the pooled held-out text"
                               if spec.get("clients") else "the clients' held-out text (scored by the clients)"),
              "perplexity_before": math.exp(before if before is not None else history[0]["central_loss"]),
              "perplexity_adapter": math.exp(adapter_loss),
              "perplexity_after": math.exp(merged_loss) if merged_loss is not None else None,
              "quantized_base": quantized, "deployed": not spec.get("clients"),
              "bytes_up_per_client_round": _mean(c["bytes_up"] for h in history[1:] for c in h["clients"]),
              "bytes_down_per_client_round": _mean(c["bytes_down"] for h in history[1:] for c in h["clients"]),
              "dropped": [{"round": h["round"], **d} for h in history[1:] for d in h["dropped"]],
              "rejected": [{"round": h["round"], **d} for h in history[1:] for d in h["rejected"]],
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with atomic_dir(out, overwrite) as tmp:
        save_model(merged, a.tokenizer, tmp / "model")
        write_federate_report(report, tmp)
    return report


def _held_out(spec: dict, tokenizer):
    from leanlm.federate import client as local

    s = spec["settings"]
    if spec.get("eval_text"):
        return local.pooled_holdout(tokenizer, [{"holdout": spec["eval_text"]}], s["seq_len"], s["eval_windows"])
    if spec.get("clients"):
        return local.pooled_holdout(tokenizer, spec["clients"], s["seq_len"], s["eval_windows"])
    return None


def _client_names(spec: dict, history: list[dict]) -> list[str]:
    if spec.get("clients"):
        return [c["name"] for c in spec["clients"]]
    return sorted({c["name"] for h in history for c in h.get("clients", [])})


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
