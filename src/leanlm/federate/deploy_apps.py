"""The Flower apps as the deployment runtime loads them (`leanlm.federate.deploy_apps:server` and `:client`
in the app's pyproject.toml): SuperLink runs `server` with the run config's `spec` file, each SuperNode runs
`client` with its node config: `data` (the client's own directory, which never leaves it), `name`, `model`
(the base, if stored elsewhere than the server says) and `done` (a file touched when the run is over)."""

from __future__ import annotations

import zlib
from pathlib import Path

from leanlm.federate.apps import evaluate_reply, server_app, train_reply

server = server_app(None)


def _client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        name, text, base = _mine(msg, context)
        return train_reply(msg, context, base, text, zlib.crc32(name.encode()) % 1_000_000)

    @app.evaluate()
    def evaluate(msg, context):
        _, text, base = _mine(msg, context)
        reply = evaluate_reply(msg, base, text)
        if bool(msg.content["config"].get("final", False)) and context.node_config.get("done"):
            Path(str(context.node_config["done"])).touch()
        return reply

    return app


def _mine(msg, context) -> tuple[str, dict, str]:
    """This client's name, text (read from its directory, held-out share as the server's settings say) and
    base model."""
    import json

    from leanlm.federate.data import client_texts

    cfg, node = msg.content["config"], context.node_config
    settings = json.loads(str(cfg["settings"]))
    data = str(node["data"])
    name = str(node.get("name") or Path(data).name)
    text = client_texts([data], 1, "topic", settings["holdout"])[0]
    return name, {"name": name, "train": text.train, "holdout": text.holdout}, str(node.get("model") or settings["model"])


client = _client_app()
