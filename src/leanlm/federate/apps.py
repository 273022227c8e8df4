"""The Flower apps: a ClientApp that trains the global adapter on the client's own text and sends back its
update (compressed for the wire), and a ServerApp that samples clients, checks and averages their updates
(FedAvg, FedProx, FedAdam), evaluates the pooled held-out text each round and checkpoints the round.

`spec` is plain data both sides read: the base model's path, the settings, and (in simulation) each
client's text. A client finds its text by Flower's `partition-id`."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np

from leanlm.federate import client as local
from leanlm.federate import wire_ops
from leanlm.federate.config import FederateError

log = logging.getLogger(__name__)


def train_reply(msg, context, base: str, text: dict, index: int, kill: tuple | None = None):
    """One client's round: the global adapter from `msg` trained on `text["train"]`, its update sent back
    (compressed as the settings in `msg` say), with the client's held-out loss of the incoming adapter."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    cfg = msg.content["config"]
    settings, rnd = json.loads(str(cfg["settings"])), int(cfg["round"])
    if kill and tuple(kill) == (index, rnd):
        # fault injection: this client fails mid-round. An exception, not the process: Flower's simulation
        # runs several clients on each Ray worker, and a dead worker takes the others queued on it too
        raise SystemError(f"client {index} was killed in round {rnd} (fault injection)")
    a = local.adapted(base, settings)
    train_ex = local.examples(a.tokenizer, text["train"], settings["seq_len"])
    held_ex = local.examples(a.tokenizer, text["holdout"], settings["seq_len"])
    start = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    a.load(start)
    holdout_loss, _ = local.mean_loss(a, held_ex)  # the incoming global adapter on this client's text
    mu = settings["proximal_mu"] if settings["strategy"] == "fedprox" else 0.0
    loss = local.local_train(a, train_ex, settings["local_steps"], settings["batch_size"], settings["lr"], mu,
                             settings["seed"] * 100_003 + rnd * 101 + index)
    end = a.state()
    delta = {n: end[n] - start[n] for n in start}
    residual = ({k: v.numpy() for k, v in context.state["residual"].items()}
                if "residual" in context.state else None)
    sent, left = wire_ops.encode(delta, settings["compress"], settings["topk"], residual)
    if left:
        context.state["residual"] = ArrayRecord({k: Array(v) for k, v in left.items()})
    metrics = MetricRecord({"num-examples": len(train_ex), "train-loss": loss, "holdout-loss": holdout_loss,
                            "bytes-up": wire_ops.nbytes(sent), "client": index})
    info = ConfigRecord({"fingerprint": a.fingerprint, "name": text["name"]})
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}), "metrics": metrics,
                          "info": info})
    return Message(content, reply_to=msg)


def evaluate_reply(msg, base: str, text: dict):
    """The adapter in `msg` scored on the client's held-out text: summed loss and tokens, so the server's
    token-weighted total is the loss over the union of the clients' held-out text."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    cfg = msg.content["config"]
    settings = json.loads(str(cfg["settings"]))
    a = local.adapted(base, settings)
    a.load({k: v.numpy() for k, v in msg.content["arrays"].items()})
    held = local.pooled_holdout(a.tokenizer, [text], settings["seq_len"], int(cfg["windows"]))
    loss, tokens = local.mean_loss(a, held)
    return Message(RecordDict({"metrics": MetricRecord({"loss-sum": loss * tokens, "tokens": tokens}),
                               "info": ConfigRecord({"fingerprint": a.fingerprint, "name": text["name"]})}),
                   reply_to=msg)


def client_app(spec: dict):
    """The simulation's ClientApp: client `partition-id` trains on its share of `spec["clients"]`."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        index = int(context.node_config["partition-id"])
        return train_reply(msg, context, spec["base"], spec["clients"][index], index, spec.get("kill"))

    return app


class ServerRun:
    """The server's state across rounds: the global adapter, FedAdam's moments, the history; checkpointed
    to `work` after every round so a stopped run resumes at the next one."""

    def __init__(self, spec: dict):
        self.spec, self.settings = spec, spec["settings"]
        self.work = Path(spec["work"])
        s = self.settings
        self.base = local.adapted(spec["base"], s)
        # in simulation the server holds every client's held-out text; deployed, it asks the clients
        self.pooled = (local.pooled_holdout(self.base.tokenizer, spec["clients"], s["seq_len"], s["eval_windows"])
                       if spec.get("clients") else None)
        self.adam = wire_ops.ServerAdam(s["server_lr"], s["server_beta1"], s["server_beta2"], s["server_tau"]) \
            if s["strategy"] == "fedadam" else None
        state = self.work / "state.json"
        if state.exists():
            saved = json.loads(state.read_text())
            self.history, self.next_round = saved["history"], saved["next_round"]
            arrays = dict(np.load(self.work / "adapter.npz"))
            self.glob = {k: v for k, v in arrays.items() if not k.startswith(("adam.m.", "adam.v."))}
            if self.adam:
                self.adam.m = {k[7:]: v for k, v in arrays.items() if k.startswith("adam.m.")}
                self.adam.v = {k[7:]: v for k, v in arrays.items() if k.startswith("adam.v.")}
            log.info("resuming at round %d of %d", self.next_round, s["rounds"])
        else:
            self.glob, self.history, self.next_round = self.base.state(), [], 1
        # Flower node id -> client name, learned from replies: a client that dies says nothing
        self.names = {c["node"]: c["name"] for h in self.history for c in h.get("clients", [])}
        self.shapes = {k: v.shape for k, v in self.glob.items()}
        self.waited = False

    def wait_for_nodes(self, grid) -> list[int]:
        """The connected clients. The first time, up to `wait_clients` seconds for all `clients` to connect;
        after that only for `min_clients`, so a client that died does not cost every later round the wait."""
        need = self.settings["min_clients"] if self.waited else self.settings["clients"]
        self.waited = True
        return _wait_for_nodes(grid, need, self.settings["wait_clients"])

    def config(self, **extra):
        """What every message carries besides the adapter: the settings, so a deployed client needs none."""
        from flwr.app import ConfigRecord

        return ConfigRecord({"settings": json.dumps(self.settings), **extra})

    def evaluate(self, grid, final: bool = False) -> float:
        """The global adapter's loss per token on the union of the clients' held-out text."""
        if self.pooled is not None:
            self.base.load(self.glob)
            loss, _ = local.mean_loss(self.base, self.pooled)
            return float(loss)
        return federated_loss(self, grid, final)

    def checkpoint(self) -> None:
        arrays = dict(self.glob)
        if self.adam:
            arrays.update({f"adam.m.{k}": v for k, v in self.adam.m.items()})
            arrays.update({f"adam.v.{k}": v for k, v in self.adam.v.items()})
        tmp = self.work / "adapter.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.work / "adapter.npz")
        (self.work / "state.tmp.json").write_text(json.dumps({"history": self.history, "next_round": self.next_round}))
        os.replace(self.work / "state.tmp.json", self.work / "state.json")

    def apply(self, deltas: list[dict], weights: list[float]) -> None:
        mean = wire_ops.weighted_mean(deltas, weights)
        step = self.adam.step(mean) if self.adam else {k: v * self.settings["server_step"] for k, v in mean.items()}
        self.glob = {k: (v + step[k]).astype(np.float32) for k, v in self.glob.items()}


def server_app(spec: dict | None):
    """The ServerApp; `spec=None` (deployed): read from the JSON file the run config's `spec` names."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.app import Context

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nonlocal spec
        if spec is None:
            spec = json.loads(Path(str(context.run_config["spec"])).read_text())
        error = Path(spec["work"]) / "error.txt"
        error.unlink(missing_ok=True)
        try:
            run = ServerRun(spec)
            if run.next_round == 1 and not run.history:
                run.history.append({"round": 0, "central_loss": run.evaluate(grid)})
                run.checkpoint()
            while run.next_round <= run.settings["rounds"]:
                run_round(run, grid)
                run.next_round += 1
                run.checkpoint()
            if run.pooled is None and not run.history[-1].get("final"):
                run.evaluate(grid, final=True)  # tells the deployed clients the run is over
        except Exception as err:  # the driver reads why the run stopped, whatever Flower does with the error
            error.write_text(f"{type(err).__name__}: {err}")
            raise

    return app


def _wait_for_nodes(grid, need: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= need or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def collect(grid, messages: list, timeout: float, poll: float = 1.0) -> tuple[list, dict[int, str]]:
    """Send `messages` and gather (node, reply) pairs until all are in, or the node a reply is awaited from
    is no longer online (it stopped answering Flower's heartbeats: a killed client), or `timeout` passes.
    The node is the one the message went to: an error reply comes from the SuperLink, not the client."""
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    pending, replies, offline = set(ids), [], {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += [(node_of[r.metadata.reply_to_message_id], r) for r in got]
        pending -= {r.metadata.reply_to_message_id for r in got}
        if pending:
            online = set(grid.get_node_ids())
            for mid in [m for m in pending if node_of[m] not in online]:
                offline[node_of[mid]] = "went offline mid-round (stopped answering Flower's heartbeats)"
                pending.discard(mid)
            time.sleep(poll)
    return replies, offline


def run_round(run: ServerRun, grid) -> None:
    from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

    s, rnd = run.settings, run.next_round
    nodes = run.wait_for_nodes(grid)
    if len(nodes) < s["min_clients"]:
        raise FederateError(f"round {rnd}: {len(nodes)} clients connected, fewer than min_clients {s['min_clients']}")
    rng = random.Random(s["seed"] * 7919 + rnd)
    sampled = rng.sample(nodes, max(s["min_clients"], round(len(nodes) * s["fraction"])))
    record = ArrayRecord({k: Array(v) for k, v in run.glob.items()})
    down = wire_ops.nbytes(run.glob)
    messages = [Message(RecordDict({"arrays": record, "config": run.config(round=rnd)}),
                        dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled]
    started = time.perf_counter()
    replies, offline = collect(grid, messages, s["round_timeout"])
    deltas, weights, clients, dropped, rejected = [], [], [], [], []
    dropped += [{"node": n, "why": why} for n, why in offline.items()]
    answered = {node for node, _ in replies} | set(offline)
    for node, reply in replies:
        if reply.has_error():
            dropped.append({"node": node, "why": reply.error.reason})
            continue
        m, info = reply.content["metrics"], reply.content["info"]
        who = {"client": int(m["client"]), "name": info["name"], "node": node}
        run.names[who["node"]] = who["name"]
        if info["fingerprint"] != run.base.fingerprint:
            raise FederateError(f"{info['name']} trains on a different base model (fingerprint {info['fingerprint']}, "
                               f"the server's is {run.base.fingerprint}); every client must start from the same model")
        try:
            delta = wire_ops.decode({k: v.numpy() for k, v in reply.content["arrays"].items()}, s["compress"],
                                    run.shapes)
        except ValueError as err:
            log.warning("round %d: rejected the update of %s: %s", rnd, info["name"], err)
            rejected.append({**who, "why": str(err)})
            continue
        deltas.append(delta)
        weights.append(float(m["num-examples"]))
        clients.append({**who, "train_loss": float(m["train-loss"]), "holdout_loss": float(m["holdout-loss"]),
                        "bytes_up": int(m["bytes-up"]), "bytes_down": down})
    dropped += [{"node": n, "why": "no reply within the round"} for n in sampled if n not in answered]
    for d in dropped:
        d["name"] = run.names.get(d["node"], f"node {d['node']}")
        d["why"] = d["why"].split("\n")[0][:300]
        log.warning("round %d: %s dropped out (%s); the round goes on without it", rnd, d["name"], d["why"])
    if len(deltas) < s["min_clients"]:
        raise FederateError(f"round {rnd}: {len(deltas)} usable updates, fewer than min_clients {s['min_clients']} "
                           f"(dropped: {len(dropped)}, rejected: {len(rejected)})")
    run.apply(deltas, weights)
    final = rnd == s["rounds"]
    run.history.append({"round": rnd, "clients": clients, "dropped": dropped, "rejected": rejected,
                        "central_loss": run.evaluate(grid, final), "seconds": time.perf_counter() - started,
                        "final": final})


def federated_loss(run: ServerRun, grid, final: bool) -> float:
    """Every connected client scores the global adapter on its held-out text (`eval_windows` shared among
    them); their token-weighted mean is the loss on the union. `final` also tells them the run is over."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

    s = run.settings
    nodes = run.wait_for_nodes(grid)
    if len(nodes) < s["min_clients"]:
        raise FederateError(f"{len(nodes)} clients connected, fewer than min_clients {s['min_clients']}, after "
                            f"waiting {s['wait_clients']:.0f} s")
    windows = -(-s["eval_windows"] // max(1, len(nodes))) if s["eval_windows"] else 0
    record = ArrayRecord({k: Array(v) for k, v in run.glob.items()})
    messages = [Message(RecordDict({"arrays": record, "config": run.config(windows=windows, final=final)}),
                        dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
    total, tokens = 0.0, 0
    for _, reply in collect(grid, messages, s["round_timeout"])[0]:
        if reply.has_error() or reply.content["info"]["fingerprint"] != run.base.fingerprint:
            log.warning("a client could not evaluate the global adapter: %s",
                        reply.error.reason if reply.has_error() else "it holds a different base model")
            continue
        total += float(reply.content["metrics"]["loss-sum"])
        tokens += int(reply.content["metrics"]["tokens"])
    if not tokens:
        raise FederateError("no client could evaluate the global adapter on its held-out text")
    return total / tokens
