"""leanlm serve: an OpenAI-compatible server. `server` (startup, shutdown), `app` (HTTP), `local` (OpenAI
requests answered by an engine), `batch_engine` (continuous batching) over `kv_slots` (the KV-cache
manager), `llamacpp_engine` (GGUF), `upstream` (proxy), `metrics`, `loadtest`."""

from leanlm.serve.server import serve

__all__ = ["serve"]
