"""A real federation on Flower's deployment runtime: `leanlm federate server` starts a SuperLink, submits
leanlm's Flower app to it and waits for the rounds; `leanlm federate client` starts a SuperNode that trains
on one data directory, which never leaves its machine. Server and clients are separate processes, on one
machine or many; Flower carries the messages (HTTP, `--insecure`: run it on loopback or inside a private
network until TLS is wired in)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leanlm.core.config import parse_config, to_dict
from leanlm.errors import ConfigError
from leanlm.federate.config import FederateConfig, FederateError
from leanlm.federate.data import client_texts
from leanlm.models.builtin import DEFAULT_MODEL

log = logging.getLogger(__name__)

APP = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "leanlm-federate"
version = "1.0.0"
description = "leanlm's federated LoRA: the ServerApp and ClientApp live in the installed leanlm package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "leanlm"

[tool.flwr.app.components]
serverapp = "leanlm.federate.deploy_apps:server"
clientapp = "leanlm.federate.deploy_apps:client"

[tool.flwr.app.config]
spec = {spec}
"""


def serve_federation(model: str = DEFAULT_MODEL, out: str | Path = "leanlm-federate",
                     config: FederateConfig | dict | None = None, eval_data: str | None = None,
                     host: str = "127.0.0.1", port: int = 9092, resume: bool = False,
                     overwrite: bool = False) -> dict:
    """Run the federation's server until its rounds are done; returns the report (written to OUT like
    `federate`'s). `config.clients` clients are awaited each round; a round goes ahead with `min_clients`."""
    from leanlm.federate.run import _finish, prepare_work, stopped_error

    _need_flower()
    cfg = config if isinstance(config, FederateConfig) else parse_config(FederateConfig, config or {}, "federate config")
    out = Path(out).expanduser()
    eval_text = None
    if eval_data:
        eval_text = client_texts([eval_data], 1, "topic", 0.5)[0]
        eval_text = eval_text.train + "\n\n" + eval_text.holdout  # all of it: the server trains on none
    settings = {**to_dict(cfg), "model": str(model)}
    work = prepare_work(out, {"model": str(model), "deployed": True, "eval_data": eval_data, **settings},
                        resume, overwrite)
    from leanlm.models.load import load_model

    base = load_model(model, "cpu")
    spec = {"base": str(base.path), "settings": settings, "work": str(work), "eval_text": eval_text}
    del base
    (work / "spec.json").write_text(json.dumps(spec))
    app = work / "app"
    app.mkdir(exist_ok=True)
    (app / "pyproject.toml").write_text(APP.replace("{spec}", json.dumps(str(work / "spec.json"))))
    env = {**os.environ, "FLWR_HOME": str(work / "flwr")}
    (work / "flwr").mkdir(exist_ok=True)
    (work / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "leanlm"\n\n[superlink.leanlm]\naddress = "{host}:{port}"\ninsecure = true\n')
    started = time.perf_counter()
    with open(work / "superlink.log", "ab") as sink:
        link = subprocess.Popen([_program("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
                                 "--disable-runtime-dependency-installation"], env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
        try:
            _wait_listening(host, port, link, work / "superlink.log")
            run_id = _submit(app, env)
            log.info("federation server on %s:%d, run %s: start the clients with "
                     "`leanlm federate client --server %s:%d --data DIR`", host, port, run_id, host, port)
            status = _wait_run(run_id, env, work, cfg.rounds)
        finally:
            _stop(link)
    state = json.loads((work / "state.json").read_text()) if (work / "state.json").exists() else {"next_round": 1}
    if state["next_round"] <= cfg.rounds:
        raise stopped_error(work, state, cfg.rounds, f"(the Flower run ended {status})")
    report = _finish(spec, state, model, out, overwrite or resume, time.perf_counter() - started)
    shutil.rmtree(work, ignore_errors=True)
    return report


def join_federation(server: str, data: str, name: str | None = None, model: str | None = None,
                    retries: int = 10, wait: float = 120.0, grace: float = 5.0) -> None:
    """Be one client of the federation at `server` (host:port) until its run is over. The data directory is
    checked before connecting; a server that does not answer is retried (`retries` times, at most `wait`
    seconds, with Flower's backoff) and then reported."""
    _need_flower()
    path = Path(data).expanduser().resolve()
    client_texts([str(path)], 1, "topic", 0.1)  # an empty or unreadable directory fails here, named
    if ":" not in server:
        raise ConfigError(f"--server {server!r}: give the server's host:port, e.g. 127.0.0.1:9092")
    with tempfile.TemporaryDirectory(prefix="leanlm-federate-client-") as tmp:
        done, logfile = Path(tmp) / "done", Path(tmp) / "supernode.log"
        node = {"data": str(path), "name": name or path.name, "model": model or "", "done": str(done)}
        args = [_program("flower-supernode"), "--insecure", "--superlink", server, "--port", str(_free_port()),
                "--max-retries", str(retries), "--max-wait-time", str(wait),
                "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node.items() if v)]
        with open(logfile, "ab") as sink:
            proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
            try:
                while not done.exists():
                    if proc.poll() is not None:
                        raise FederateError(_client_failed(server, retries, wait, proc.returncode, logfile))
                    time.sleep(0.5)
                time.sleep(grace)  # the final reply leaves the SuperNode before it stops
            finally:
                _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _client_failed(server: str, retries: int, wait: float, code: int, logfile: Path) -> str:
    said = logfile.read_text(errors="replace")
    tail = said.strip().splitlines()[-5:]
    if "Exit Code: 305" in said or "Connection attempt failed" in said:  # Flower's code for "no SuperLink there"
        return (f"the federation server at {server} did not answer ({retries} tries over at most {wait:.0f} s); "
                "check that `leanlm federate server` runs there and that the address and port are right")
    return f"the Flower SuperNode stopped (exit code {code}); its last lines:\n" + "\n".join(tail)


def _need_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("leanlm federate runs on Flower: pip install 'leanlm[federated]'") from None


def _program(name: str) -> str:
    """A console script flwr installed: beside this Python first (a virtual environment), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"`{name}` (installed with flwr) was not found beside {sys.executable} or on PATH; "
                          "reinstall with pip install 'leanlm[federated]'")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, proc: subprocess.Popen, logfile: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(logfile.read_text(errors="replace").strip().splitlines()[-5:])
            raise FederateError(f"the Flower SuperLink did not start on {host}:{port} (is the port taken? "
                                f"choose another with --port):\n{tail}")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise FederateError(f"the Flower SuperLink did not listen on {host}:{port} within {timeout:.0f} s; "
                        f"see {logfile}")


def _flwr(args: list[str], env: dict) -> dict:
    done = subprocess.run([_program("flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True)
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise FederateError(f"`flwr {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-500:]}") from None
    if not reply.get("success", False):
        raise FederateError(f"`flwr {' '.join(args)}` failed: {reply.get('error-message', reply)}")
    return reply


def _submit(app: Path, env: dict) -> str:
    return str(_flwr(["run", str(app), "leanlm"], env)["run-id"])


def _wait_run(run_id: str, env: dict, work: Path, rounds: int, poll: float = 10.0) -> str:
    """Until the Flower run finishes; rounds are shown as the server checkpoints them."""
    from tqdm.auto import tqdm

    bar = tqdm(total=rounds, desc="federated rounds", unit="round")
    try:
        while True:
            time.sleep(poll)
            state = work / "state.json"
            if state.exists():
                bar.n = max(0, json.loads(state.read_text())["next_round"] - 1)
                bar.refresh()
            runs = _flwr(["ls", "leanlm", "--run-id", run_id], env)["runs"]
            status = runs[0]["status"] if runs else "unknown"
            if status.startswith("finished"):
                return status
    finally:
        bar.close()
