"""`leanlm federate`: LoRA fine-tuning across clients that keep their data (Flower)."""

from __future__ import annotations

from leanlm.cli.options import command, config_options, config_values, model_argument, output_options

HELPS = {
    "clients": "simulated clients when no --data is given (with --data: one client per path)",
    "rounds": "federated rounds",
    "fraction": "share of the clients sampled each round",
    "min_clients": "a round goes ahead with at least this many updates",
    "split": "how the built-in corpus is dealt to clients: topic (non-IID) or iid",
    "local_steps": "optimizer steps per client per round",
    "batch_size": "windows per local step",
    "seq_len": "tokens per training window",
    "lr": "clients' AdamW learning rate",
    "rank": "LoRA rank",
    "strategy": "server aggregation",
    "proximal_mu": "FedProx's pull towards the global adapter",
    "server_lr": "FedAdam's server step",
    "compress": "how updates travel: float32, int8 (one scale per row) or topk (with error feedback)",
    "topk": "with --compress topk: share of each tensor's entries sent",
    "eval_windows": "pooled held-out windows the server scores each round (0: all)",
    "seed": "seed of sampling, batches and adapter init",
}


def add_parser(sub) -> None:
    from leanlm.federate.config import FederateConfig

    p = command(sub, "federate", "fine-tune LoRA across clients that keep their data (Flower)",
                "Federated LoRA (QLoRA over a leanlm-quantized model) on Flower's simulation engine, clients on a "
                "local Ray cluster: each round the server samples clients, each trains the global adapter on its "
                "own text and sends back its update (compressed with --compress), the server checks and averages "
                "them (--strategy) and evaluates the pooled held-out text. The result is merged into the base "
                "(requantized if quantized) and written to OUT/model with report.md, report.json and chart.png.",
                run)
    model_argument(p, "base model every client starts from")
    p.add_argument("--data", nargs="+", metavar="DIR",
                   help="one directory or file of text per client (default: the built-in corpus dealt to --clients)")
    config_options(p, FederateConfig(), HELPS)
    p.add_argument("--resume", action="store_true", help="continue a stopped run into the same OUT")
    output_options(p, "leanlm-federate")


def run(args) -> int:
    from leanlm.federate import federate

    report = federate(args.model, args.out, args.data, config_values(args, HELPS), resume=args.resume,
                      overwrite=args.overwrite)
    print(f"perplexity on the pooled held-out text: {report['perplexity_before']:.3f} -> "
          f"{report['perplexity_after']:.3f} after {len(report['history']) - 1} rounds "
          f"({report['bytes_up_per_client_round'] / 1024:.0f} KiB up per client per round)")
    for d in report["dropped"]:
        print(f"  round {d['round']}: {d['name']} dropped out ({d['why']})")
    print(f"model: {args.out}/model; report: {args.out}/report.md")
    return 0
