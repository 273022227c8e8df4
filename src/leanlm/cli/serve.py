"""`leanlm serve`: an OpenAI-compatible server for a model leanlm loads or writes, or in front of another server."""

from __future__ import annotations

from leanlm.cli.options import command, positive_int


def add_parser(sub) -> None:
    p = command(sub, "serve", "serve a model behind OpenAI's API (chat, completions, streaming)",
                "Serve MODEL (a built-in name, a Hugging Face or leanlm directory, or with --backend llama.cpp a "
                ".gguf file) on OpenAI's API: POST /v1/chat/completions and /v1/completions (streaming too), "
                "GET /v1/models, /health, /metrics (Prometheus) and a playground page at /. Concurrent requests "
                "are batched token by token. With --upstream URL, leanlm's front (keys, limits, metrics) runs "
                "before another OpenAI-compatible server instead. SIGTERM finishes the requests in flight, then "
                "exits.", run)
    p.add_argument("model", nargs="?", help="what to serve (omit with --upstream)")
    p.add_argument("--backend", default="leanlm", choices=["leanlm", "llama.cpp"],
                   help="leanlm (PyTorch, continuous batching) or llama.cpp (GGUF, one request at a time) "
                        "(default: leanlm)")
    p.add_argument("--upstream", metavar="URL", help="proxy to this OpenAI-compatible server instead of a MODEL")
    p.add_argument("--upstream-key", help="API key to send to the upstream server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", help="the model's id in the API (default: MODEL as given)")
    p.add_argument("--api-keys", metavar="FILE", help="'KEY TENANT' per line; requests then need a key")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: one per core)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together (default: 16)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a slot before new ones get 429 (default: 64)")
    p.add_argument("--max-len", type=positive_int, default=2048,
                   help="longest prompt plus answer, in tokens (default: 2048, or the model's context if shorter)")
    p.add_argument("--prefill-chunk", type=positive_int, default=256,
                   help="prompt tokens run per step, so long prompts do not stall running answers (default: 256)")
    p.add_argument("--max-n", type=positive_int, default=8, help="most choices (n) per request (default: 8)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take (default: 600)")
    p.add_argument("--max-body", type=positive_int, default=1 << 20, help="largest request body in bytes (default: 1 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to let requests in flight finish on SIGTERM (default: 30)")
    p.add_argument("--cache", default="", metavar="TIERS",
                   help="caches, comma-separated: exact (whole answers to the same request, per tenant and model), "
                        "semantic (to the same question asked another way: retrieved by embedding, served only if "
                        "the guards and the verifier pass), prefix (the KV of shared prompt prefixes) (default: none)")
    p.add_argument("--semantic-config", metavar="JSON", help="verifier weights and threshold from `leanlm cache "
                                                            "calibrate` (default: the shipped calibration)")
    p.add_argument("--cache-store", metavar="URL", help="sqlite (default, in --cache-dir) or redis://HOST:PORT/DB")
    p.add_argument("--cache-dir", default="~/.cache/leanlm/serve-cache", help="where the SQLite store lives")
    p.add_argument("--cache-ttl", type=float, default=7 * 24 * 3600.0, help="seconds a cached answer lives (default: 7 days)")
    p.add_argument("--cache-max-entries", type=positive_int, default=100_000, help="entries before LRU eviction")
    p.add_argument("--prefix-cache-mb", type=positive_int, default=1024, help="memory for the prefix cache's KV (default: 1024)")
    p.add_argument("--prepack", default="off", choices=["auto", "on", "off"],
                   help="float32 CPU linears through oneDNN with weights packed once (auto: wherever the model has "
                        "them; on: refuse a model with none; costs a second copy of those weights in memory; "
                        "default: off, see docs/serve.md)")
    p.add_argument("--compress-context", type=int, default=0, metavar="N",
                   help="compress prompts longer than N tokens to about N before the model (the last user message "
                        "is the question, earlier messages the context; see docs/prompt.md; default: 0, off)")
    p.add_argument("--speculative", metavar="MODE",
                   help="speculative decoding while one request decodes alone: lookup[:N] (prompt lookup, for answers "
                        "that quote their prompt) or draft:MODEL (a smaller model sharing the tokenizer, e.g. leanlm's "
                        "int8 of it); exact for greedy and sampled requests; measured against plain steps as it runs "
                        "and kept only while faster (default: off)")
    p.add_argument("--step", default="mixed", choices=["mixed", "padded"],
                   help="the engine's forward pass: mixed (every decoding row's next token and a prompt chunk in one "
                        "pass, checked against the model at start) or padded (a prefill pass, then a decode pass; "
                        "default: mixed, see docs/serve.md)")
    p.add_argument("--max-draft", type=positive_int, default=8, help="most tokens drafted per step (default: 8)")


def run(args) -> int:
    from leanlm.cli.options import set_threads
    from leanlm.serve import serve

    set_threads(args)
    options = {k: getattr(args, k) for k in ("backend", "upstream", "upstream_key", "host", "port", "device",
                                               "api_keys", "max_batch", "max_queue", "max_len", "prefill_chunk",
                                               "max_n", "request_timeout", "max_body", "drain_timeout", "cache",
                                               "cache_store", "cache_dir", "cache_ttl", "cache_max_entries",
                                               "prefix_cache_mb", "semantic_config", "prepack", "compress_context", "speculative", "max_draft", "step")}
    serve(args.model, served_name=args.served_model_name, **options)
    return 0
