"""`serve(...)`: load the model (a path that does not load fails here, before any port is bound), bind the
port (one in use is a clear error), then answer on it with uvicorn while the engine warms up (503 until
it has). SIGTERM or Ctrl-C stops taking connections, lets the requests in flight finish (up to
`drain_timeout`), then exits."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import signal
import socket
import threading
from pathlib import Path

from leanlm.errors import ConfigError, LeanLMError

log = logging.getLogger("leanlm.serve")


def require_serve_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise LeanLMError(f"leanlm serve needs {', '.join(missing)}: pip install 'leanlm[serve]'")


def read_api_keys(path: str | Path) -> dict[str, str]:
    """KEY TENANT per line; # starts a comment. Keys are unique; a tenant may have several."""
    keys: dict[str, str] = {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--api-keys {path}: no such file (one 'KEY TENANT' per line)")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{path}:{n}: expected 'KEY TENANT' (two words), got {len(parts)} word(s)")
        key, tenant = parts
        if key in keys:
            raise ConfigError(f"{path}:{n}: key {key[:4]}... appears twice (first for tenant {keys[key]!r})")
        keys[key] = tenant
    if not keys:
        raise ConfigError(f"--api-keys {path} holds no keys")
    return keys


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise LeanLMError(f"port {port} on {host} is already in use; stop what holds it or pick another with --port") from None
        raise LeanLMError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_engine(model: str, backend: str, device: str, max_batch: int, max_queue: int, max_len: int,
                 prefill_chunk: int, metrics):
    if backend == "llama.cpp":
        path = Path(model)
        if path.suffix != ".gguf" or not path.is_file():
            raise ConfigError(f"--backend llama.cpp serves a .gguf file; {model!r} is not one (export one with "
                              "`leanlm export MODEL --format gguf`)")
        from transformers import AutoTokenizer

        from leanlm.serve.llamacpp_engine import LlamaCppEngine

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return LlamaCppEngine(path, tokenizer, max_len=max_len, max_queue=max_queue, on_step=metrics.step)
    if backend != "leanlm":
        raise ConfigError(f"unknown backend {backend!r}; choose leanlm or llama.cpp")
    from leanlm.models.load import load_model
    from leanlm.serve.batch_engine import BatchEngine

    loaded = load_model(model, device)
    engine = BatchEngine(loaded, max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                         prefill_chunk=prefill_chunk, on_step=metrics.step)
    _check_kv_memory(engine)
    return engine


def _check_kv_memory(engine) -> None:
    """The KV cache grows with use; say up front if a full batch at full length would not fit."""
    import psutil

    cache = engine.cache
    per_token = 2 * cache.layers * cache.shape[0] * cache.shape[1] * cache.keys[0].element_size()
    full = per_token * engine.max_batch * engine.max_len
    free = psutil.virtual_memory().available
    if full > free:
        log.warning("a full batch (%d sequences of %d tokens) needs %.1f GiB of KV cache, more than the %.1f GiB "
                    "available now; lower --max-batch or --max-len", engine.max_batch, engine.max_len, full / 2**30,
                    free / 2**30)


def serve(model: str | None = None, *, upstream: str | None = None, upstream_key: str | None = None,
          backend: str = "leanlm", host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          served_name: str | None = None, api_keys: str | None = None, max_batch: int = 16, max_queue: int = 64,
          max_len: int = 2048, prefill_chunk: int = 256, max_n: int = 8, request_timeout: float = 600.0,
          max_body: int = 1 << 20, drain_timeout: float = 30.0, ready: threading.Event | None = None) -> None:
    """Serve `model` (or proxy `upstream`) on host:port until SIGTERM/SIGINT."""
    require_serve_extra()
    import uvicorn

    from leanlm.serve.app import State, create_app
    from leanlm.serve.local import Limits, LocalService
    from leanlm.serve.metrics import Metrics

    if (model is None) == (upstream is None):
        raise ConfigError("serve a MODEL or an --upstream URL (one of them)")
    keys = read_api_keys(api_keys) if api_keys else None
    metrics = Metrics()
    state = State(metrics, keys, max_body)
    service = engine = None
    if upstream:
        from leanlm.serve.upstream import UpstreamService

        service = UpstreamService(upstream, metrics, upstream_key, max_inflight=max_queue, request_timeout=request_timeout)
        metrics.load = service.load
    else:
        engine = build_engine(model, backend, device, max_batch, max_queue, max_len, prefill_chunk, metrics)
        metrics.load = engine.load
        service = LocalService(engine, served_name or model, Limits(max_n, request_timeout), metrics)
    sock = bind(host, port)

    async def warm():
        try:
            if engine is not None:
                await asyncio.to_thread(engine.warmup)
            else:
                await service.check()
        except Exception as err:  # the server keeps answering 503 and says why
            log.error("not ready: %s", err)
            return
        state.service = service
        log.info("ready: %s on http://%s:%d", service.models()[0]["id"] if service.models() else upstream,
                 host, sock.getsockname()[1])
        if ready is not None:
            ready.set()

    app = create_app(state, on_start=warm)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout, access_log=False,
                            lifespan="on")
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn drains on SIGTERM, then raises it again for the handler it found: make that one a no-op,
        # so a drained shutdown exits 0 rather than as an interrupted command
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        if engine is not None:
            engine.close(drain=True, timeout=drain_timeout)
        sock.close()
        log.info("stopped")
