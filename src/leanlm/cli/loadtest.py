"""`leanlm loadtest`: replay a chat workload against an OpenAI-compatible server at fixed concurrency levels."""

from __future__ import annotations

import json
from pathlib import Path

from leanlm.cli.options import positive_int


def add_parser(sub) -> None:
    from leanlm.cli.options import command

    p = command(sub, "loadtest", "measure an OpenAI-compatible server under concurrent chat traffic",
                "Stream chat requests (a shared system prompt; user questions and passages of the built-in corpus; "
                "log-normal answer lengths, all from --seed) to URL with the async openai client, at each "
                "--concurrency level. Prints requests/s, output tokens/s, TTFT and inter-token latency p50/p99 "
                "and errors by status; --json writes them.", run)
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model id to ask for (default: the server's first in /v1/models)")
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels (default: 1,8)")
    p.add_argument("--requests", type=positive_int, default=32, help="requests per level (default: 32)")
    p.add_argument("--mean-tokens", type=positive_int, default=64, help="mean answer length (default: 64)")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="longest answer (default: 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    p.add_argument("--json", help="write the rows here")


def run(args) -> int:
    from leanlm.errors import ConfigError
    from leanlm.serve.loadtest import format_table, loadtest

    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise ConfigError(f"--concurrency {args.concurrency!r}: write whole numbers separated by commas, e.g. 1,8,32") from None
    if any(c < 1 for c in levels):
        raise ConfigError("--concurrency levels must be at least 1")
    rows = loadtest(args.url, args.model, levels, args.requests, args.mean_tokens, args.max_tokens, args.seed,
                    args.api_key, args.timeout)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
