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
    "freeze_a": "FFA-LoRA: keep LoRA's A at its shared init and train and send only B (exact averaging, half the bytes)",
    "strategy": "server aggregation",
    "proximal_mu": "FedProx's pull towards the global adapter",
    "server_lr": "FedAdam's server step",
    "server_step": "FedAvg/FedProx: the mean update is applied times this (1: plain FedAvg)",
    "compress": "how updates travel: float32, int8 (one scale per row) or topk (with error feedback)",
    "topk": "with --compress topk: share of each tensor's entries sent",
    "eval_windows": "pooled held-out windows the server scores each round (0: all)",
    "wait_clients": "seconds a round waits for all --clients to connect before going on with those connected",
    "seed": "seed of sampling, batches and adapter init",
}


def add_parser(sub) -> None:
    import argparse

    from leanlm.federate.config import FederateConfig

    p = command(sub, "federate", "fine-tune LoRA across clients that keep their data (Flower)",
                "Federated LoRA (QLoRA over a leanlm-quantized model) on Flower. `simulate` runs every client on a "
                "local Ray cluster; `server` and `client` are a real federation (Flower's SuperLink and SuperNodes, "
                "separate processes or machines, each client with its own data directory). Each round the server "
                "samples clients, each trains the global adapter on its own text and sends back its update "
                "(compressed with --compress), the server checks and averages them (--strategy) and scores the "
                "clients' pooled held-out text. The result is merged into the base (requantized if quantized) and "
                "written to OUT/model with report.md, report.json and chart.png.", run)
    modes = p.add_subparsers(dest="federate_command", metavar="MODE", required=True)
    sim = command(modes, "simulate", "every client in this machine's Ray cluster (Flower's simulation engine)",
                  "Simulated clients on Flower's simulation engine: the built-in corpus dealt to --clients (by topic, "
                  "non-IID, or iid), or one --data directory per client.", run_simulate)
    model_argument(sim, "base model every client starts from")
    sim.add_argument("--data", nargs="+", metavar="DIR",
                     help="one directory or file of text per client (default: the built-in corpus dealt to --clients)")
    config_options(sim, FederateConfig(), HELPS)
    sim.add_argument("--simulation", dest="clients", type=int, metavar="N", default=argparse.SUPPRESS,
                     help="same as --clients")
    sim.add_argument("--resume", action="store_true", help="continue a stopped run into the same OUT")
    output_options(sim, "leanlm-federate")
    srv = command(modes, "server", "the federation's server (a Flower SuperLink) until its rounds are done",
                  "Starts a Flower SuperLink on --host:--port, submits leanlm's Flower app, waits for --clients "
                  "clients (`leanlm federate client --server HOST:PORT --data DIR` on their machines) and runs the "
                  "rounds. The server holds no client text: the global adapter is scored by the clients on their "
                  "held-out text; --eval-data adds a server-side score of the adapter and the merged model.",
                  run_server)
    model_argument(srv, "base model every client starts from (clients load the same name, or their --model)")
    server_helps = {k: v for k, v in HELPS.items() if k != "split"}
    server_helps["clients"] = "clients awaited each round (it goes ahead with --min-clients)"
    config_options(srv, FederateConfig(), server_helps)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=9092, help="port to listen on (default: 9092)")
    srv.add_argument("--eval-data", metavar="PATH", help="server-side held-out text to score the result on")
    srv.add_argument("--resume", action="store_true", help="continue a stopped run into the same OUT")
    output_options(srv, "leanlm-federate")
    cli = command(modes, "client", "one client of a federation: trains on --data, which never leaves this machine",
                  "Starts a Flower SuperNode that connects to the server, trains the global adapter on --data each "
                  "round it is sampled and sends back its update; exits when the server's run is over. A server "
                  "that does not answer is retried --retries times (with backoff, at most --wait seconds).",
                  run_client)
    cli.add_argument("--server", required=True, metavar="HOST:PORT", help="the `leanlm federate server` address")
    cli.add_argument("--data", required=True, metavar="DIR", help="this client's text (a directory or file)")
    cli.add_argument("--name", help="this client's name in the server's report (default: the data directory's name)")
    cli.add_argument("--model", help="the base model's path here, if not where the server's name resolves")
    cli.add_argument("--retries", type=int, default=10, help="connection attempts before giving up (default: 10)")
    cli.add_argument("--wait", type=float, default=120.0, help="seconds of retrying before giving up (default: 120)")


def _print_report(report: dict, out: str) -> None:
    after = report["perplexity_after"] or report["perplexity_adapter"]
    print(f"perplexity on {report['evaluated_on']}: {report['perplexity_before']:.3f} -> {after:.3f} after "
          f"{len(report['history']) - 1} rounds ({report['bytes_up_per_client_round'] / 1024:.0f} KiB up per client "
          "per round)")
    for d in report["dropped"]:
        print(f"  round {d['round']}: {d['name']} dropped out ({d['why']})")
    print(f"model: {out}/model; report: {out}/report.md")


def run_simulate(args) -> int:
    from leanlm.federate import federate

    report = federate(args.model, args.out, args.data, config_values(args, HELPS), resume=args.resume,
                      overwrite=args.overwrite)
    _print_report(report, args.out)
    return 0


def run_server(args) -> int:
    from leanlm.federate.deploy import serve_federation

    values = {k: getattr(args, k) for k in HELPS if k != "split"}
    report = serve_federation(args.model, args.out, values, args.eval_data, args.host, args.port,
                              resume=args.resume, overwrite=args.overwrite)
    _print_report(report, args.out)
    return 0


def run_client(args) -> int:
    from leanlm.federate.deploy import join_federation

    join_federation(args.server, args.data, args.name, args.model, args.retries, args.wait)
    print(f"the federation at {args.server} finished its run")
    return 0


def run(args) -> int:
    modes = {"simulate": run_simulate, "server": run_server, "client": run_client}
    return modes[args.federate_command](args)
