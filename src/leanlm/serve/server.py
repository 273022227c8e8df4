"""`serve(...)`: load the model (a path that does not load fails here, before any port is bound), bind the
port (one in use is a clear error), then answer on it with uvicorn while the engine warms up (503 until
it has). SIGTERM or Ctrl-C stops taking connections, lets the requests in flight finish (up to
`drain_timeout`), then exits."""

from __future__ import annotations

import asyncio
import errno
import functools
import importlib.util
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from leanlm.core.config import Validated, parse_config
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


@dataclass
class ServeConfig(Validated):
    """Every option of `leanlm serve` (the CLI's flags are these fields)."""

    backend: Literal["leanlm", "llama.cpp"] = "leanlm"
    upstream: str | None = None
    upstream_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    served_name: str | None = None
    api_keys: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_len: int = 2048
    prefill_chunk: int = 256
    max_n: int = 8
    request_timeout: float = 600.0
    max_body: int = 1 << 20
    drain_timeout: float = 30.0
    cache: str = ""  # tiers, comma-separated: exact, semantic, prefix
    cache_store: str | None = None
    cache_dir: str = "~/.cache/leanlm/serve-cache"
    cache_ttl: float = 7 * 24 * 3600.0
    cache_max_entries: int = 100_000
    prefix_cache_mb: int = 1024
    semantic_config: str | None = None
    # float32 CPU linears through oneDNN with prepacked weights (runtime.onednn_linear): "auto" where it
    # applies (a CPU model with float32 nn.Linear layers: float models, and the float LM head of an int8 one).
    # Off by default: measured through the server (BENCHMARKS.md, 2026-12-07) it bought nothing at
    # concurrency 8 and lost 13% at concurrency 1, though a bare batch-1 decode loop gains 1.4x from it
    prepack: Literal["auto", "on", "off"] = "off"
    # prompts longer than this many tokens are compressed to about it before the model (0: never)
    compress_context: int = 0
    # lookup[:N] or draft:MODEL: speculative steps while one sequence decodes alone, kept only while faster
    speculative: str | None = None
    max_draft: int = 8
    # "mixed": decoding rows and a prompt chunk in one forward pass (checked against the model at start);
    # "padded": a prefill pass and a decode pass per step (what a model the check refuses gets anyway)
    step: Literal["mixed", "padded"] = "mixed"

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "max_len", "prefill_chunk", "max_n", "max_body", "prefix_cache_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.compress_context < 0:
            raise ConfigError(f"compress_context must be 0 (off) or a token count, got {self.compress_context}")
        if self.compress_context and self.upstream:
            raise ConfigError("--compress-context scores prompts with the served model, which --upstream does not "
                              "load; compress before the upstream (leanlm prompt compress) or serve the model here")
        if self.compress_context and self.backend == "llama.cpp":
            raise ConfigError("--compress-context scores prompts with a model leanlm loads in PyTorch; --backend "
                              "llama.cpp serves a GGUF file: serve the model's directory with --backend leanlm")
        if self.speculative:
            self._check_speculative()
        if self.step != "mixed" and (self.upstream or self.backend == "llama.cpp"):
            raise ConfigError(f"--step {self.step} lays out leanlm's own engine's passes; "
                              f"{'--upstream' if self.upstream else '--backend llama.cpp'} runs another engine")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0..65535, got {self.port}")


    def _check_speculative(self) -> None:
        kind = self.speculative.partition(":")[0]
        if self.upstream or self.backend == "llama.cpp":
            raise ConfigError("--speculative runs in leanlm's own engine; " + (
                "with --upstream, turn on the upstream server's own (vLLM: --speculative-config)" if self.upstream else
                "llama.cpp's server drafts with its own options (llama-server --model-draft FILE, or --lookup "
                "decoding in llama-lookup); serve the model's directory with --backend leanlm for lookup or draft"))
        if kind not in ("lookup", "draft"):
            raise ConfigError(f"--speculative {self.speculative!r}: the server takes lookup, lookup:N (longest n-gram "
                              "N) or draft:MODEL (a model sharing the served one's tokenizer)" +
                              ("; self-speculation is measured with `leanlm bench --speculative self:DIR`"
                               if kind == "self" else ""))
        if self.max_draft < 1:
            raise ConfigError(f"max_draft must be at least 1, got {self.max_draft}")


def build_engine(model: str, cfg: ServeConfig, metrics, prefix: bool):
    """The engine for `model` (loaded here, before any port is bound) and the path of its files."""
    if cfg.backend == "llama.cpp":
        path = Path(model)
        if path.suffix != ".gguf" or not path.is_file():
            raise ConfigError(f"--backend llama.cpp serves a .gguf file; {model!r} is not one (export one with "
                              "`leanlm export MODEL --format gguf`)")
        from transformers import AutoTokenizer

        from leanlm.serve.llamacpp_engine import LlamaCppEngine

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return LlamaCppEngine(path, tokenizer, max_len=cfg.max_len, max_queue=cfg.max_queue, on_step=metrics.step), path
    from leanlm.serve.batch_engine import BatchEngine
    from leanlm.serve.prefix_cache import PrefixCache

    engine = BatchEngine(lambda: load_for_serving(model, cfg), max_batch=cfg.max_batch, max_queue=cfg.max_queue, max_len=cfg.max_len,
                         prefill_chunk=cfg.prefill_chunk, on_step=metrics.step,
                         prefix_cache=PrefixCache(budget_bytes=cfg.prefix_cache_mb << 20) if prefix else None,
                         speculative=cfg.speculative, max_draft=cfg.max_draft, mixed=cfg.step == "mixed")
    _check_kv_memory(engine)
    if engine.spec is not None:
        metrics.watch_speculation(engine.spec)
    return engine, engine.loaded.path


def load_for_serving(model: str, cfg: ServeConfig):
    """`model` loaded, its float32 CPU linears prepacked for oneDNN unless `--prepack off`. Eager nn.Linear on
    CPU repacks its weight inside every call, which costs more than the multiply at the few rows a decode
    step feeds; the packed copy is taken once (and costs a second copy of those weights in memory)."""
    from leanlm.models.load import load_model
    from leanlm.runtime.onednn_linear import has_float_linears, onednn_available, pack_linears

    loaded = load_model(model, cfg.device)
    if cfg.prepack == "off":
        return loaded
    why = ("the model runs on " + loaded.device.type if loaded.device.type != "cpu" else
           "this PyTorch build has no oneDNN" if not onednn_available() else
           "the model has no float32 nn.Linear (its quantized layers have kernels of their own)"
           if not has_float_linears(loaded.model) else None)
    if why is None:
        count = pack_linears(loaded.model)
        log.info("prepacked %d float32 linears for oneDNN (--prepack off keeps eager nn.Linear)", count)
    elif cfg.prepack == "on":
        raise ConfigError(f"--prepack on: nothing to prepack: {why}; use --prepack auto or off")
    return loaded


def build_service(model: str | None, cfg: ServeConfig, metrics):
    """(the service the routes call, the engine or None, what warming up awaits)."""
    from leanlm.cache.response_cache import parse_tiers
    from leanlm.serve.local import Limits, LocalService

    tiers = parse_tiers(cfg.cache) if cfg.cache else ()
    engine = None
    if cfg.upstream:
        from leanlm.serve.upstream import UpstreamService

        service = UpstreamService(cfg.upstream, metrics, cfg.upstream_key, max_inflight=cfg.max_queue,
                                  request_timeout=cfg.request_timeout)
        metrics.load, files, warm = service.load, None, service.check
        if "prefix" in tiers:
            raise ConfigError("--cache prefix keeps KV inside leanlm's own engine; with --upstream, use the "
                              "upstream's prefix caching (vLLM: --enable-prefix-caching)")
    else:
        engine, files = build_engine(model, cfg, metrics, "prefix" in tiers)
        metrics.load = engine.load
        compressor = None
        if cfg.compress_context:
            from leanlm.serve.compress_context import ContextCompressor

            compressor = ContextCompressor(engine.loaded, cfg.compress_context)
        service = LocalService(engine, cfg.served_name or model, Limits(cfg.max_n, cfg.request_timeout), metrics,
                               compressor)
        warm = functools.partial(asyncio.to_thread, engine.warmup)
    response_tiers = [t for t in tiers if t != "prefix"]
    if response_tiers:
        service = _with_response_cache(service, cfg, response_tiers, files, model or cfg.upstream, metrics)
    return service, engine, warm


def _with_response_cache(service, cfg: ServeConfig, tiers, files, name: str, metrics):
    from leanlm.cache.keys import model_fingerprint
    from leanlm.cache.response_cache import CacheConfig, ResponseCache, open_store
    from leanlm.serve.cached import CachedService

    config = CacheConfig(tiers=tuple(tiers), ttl_s=cfg.cache_ttl, max_entries=cfg.cache_max_entries)
    store = open_store(cfg.cache_store, str(Path(cfg.cache_dir).expanduser()), config)
    semantic = None
    if "semantic" in tiers:
        from leanlm.cache.semantic import SemanticConfig, SemanticTier

        semantic = SemanticTier(store, SemanticConfig.load(cfg.semantic_config))
    fingerprint = model_fingerprint(files, name, extra=cfg.upstream or "")
    log.info("response cache: %s in %s, model fingerprint %s", ",".join(tiers), store.kind, fingerprint[:12])
    return CachedService(service, ResponseCache(store, fingerprint, config, semantic), metrics)


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


def serve(model: str | None = None, ready: threading.Event | None = None, **options) -> None:
    """Serve `model` (or proxy `upstream=URL`) until SIGTERM/SIGINT; `options` are ServeConfig's fields."""
    require_serve_extra()
    import uvicorn

    from leanlm.serve.app import State, create_app
    from leanlm.serve.metrics import Metrics

    cfg = parse_config(ServeConfig, options, "serve")
    if (model is None) == (cfg.upstream is None):
        raise ConfigError("serve a MODEL or an --upstream URL (one of them)")
    keys = read_api_keys(cfg.api_keys) if cfg.api_keys else None
    metrics = Metrics()
    state = State(metrics, keys, cfg.max_body)
    service, engine, warm_up = build_service(model, cfg, metrics)
    sock = bind(cfg.host, cfg.port)

    async def warm():
        try:
            await warm_up()
        except Exception as err:  # the server keeps answering 503 and says why
            log.error("not ready: %s", err)
            return
        state.service = service
        log.info("ready: %s on http://%s:%d", service.models()[0]["id"] if service.models() else cfg.upstream,
                 cfg.host, sock.getsockname()[1])
        if ready is not None:
            ready.set()

    app = create_app(state, on_start=warm)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=cfg.drain_timeout, access_log=False,
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
            engine.close(drain=True, timeout=cfg.drain_timeout)
        cache = getattr(service, "cache", None)
        if cache is not None:
            cache.flush()
        sock.close()
        log.info("stopped")
