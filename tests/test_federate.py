"""`leanlm federate` on Flower's simulation engine (clients on a local Ray cluster), on a tiny Llama: the
wire formats, and a run in which one client's process is killed mid-round."""

import json

import numpy as np
import pytest

from leanlm.errors import ConfigError, DataError
from leanlm.federate import wire_ops
from leanlm.federate.config import FederateConfig
from leanlm.federate.data import client_texts


def test_wire_formats_round_trip_and_refuse_bad_updates():
    rng = np.random.default_rng(0)
    delta = {"a": rng.standard_normal((8, 32)).astype(np.float32), "b": rng.standard_normal(16).astype(np.float32)}
    shapes = {k: v.shape for k, v in delta.items()}
    sent, _ = wire_ops.encode(delta, "int8")
    back = wire_ops.decode(sent, "int8", shapes)
    assert all(np.abs(back[k] - delta[k]).max() <= np.abs(delta[k]).max() / 127 for k in delta)
    assert wire_ops.nbytes(sent) < wire_ops.nbytes(delta) / 3.5
    # top-k with error feedback: what is not sent now is sent later, so two rounds deliver more than one
    sent, left = wire_ops.encode(delta, "topk", 0.25)
    first = wire_ops.decode(sent, "topk", shapes)
    assert sum(int((first[k] != 0).sum()) for k in delta) == 64 + 4
    np.testing.assert_allclose(first["a"] + left["a"], delta["a"], atol=1e-2)
    zero = {k: np.zeros_like(v) for k, v in delta.items()}
    sent2, _ = wire_ops.encode(zero, "topk", 0.25, left)
    assert np.abs(wire_ops.decode(sent2, "topk", shapes)["a"]).sum() > 0
    with pytest.raises(ValueError, match="NaN"):
        wire_ops.decode({"a": np.full((8, 32), np.nan, np.float32), "b": delta["b"]}, "none", shapes)
    with pytest.raises(ValueError, match="shape"):
        wire_ops.decode({"a": delta["a"][:4], "b": delta["b"]}, "none", shapes)
    with pytest.raises(ValueError, match="do not match"):
        wire_ops.decode({"a": delta["a"]}, "none", shapes)


def test_client_data_and_settings_are_checked(tmp_path):
    topic = client_texts(None, 4, "topic", 0.1)
    iid = client_texts(None, 4, "iid", 0.1)
    assert len(topic) == len(iid) == 4 and all(c.train and c.holdout for c in topic)
    assert topic[0].train[:200] != iid[0].train[:200] or topic[1].train[:200] != iid[1].train[:200]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="client 0"):
        client_texts([str(tmp_path / "empty")], 1, "topic", 0.1)
    with pytest.raises(ConfigError, match="min_clients"):
        FederateConfig(clients=2, min_clients=3)
    with pytest.raises(ConfigError, match="fewer than min_clients"):
        FederateConfig(clients=4, fraction=0.25, min_clients=2)


@pytest.mark.filterwarnings("ignore")
def test_a_client_killed_mid_round_and_the_run_finishes(tmp_path):
    """4 clients, at least 2 a round; client 1 fails in round 2: the round goes on with 3 and the report says so."""
    pytest.importorskip("flwr")
    from leanlm.federate import federate
    from tests.conftest import build_tokenizer, tiny_llama

    tok = build_tokenizer()
    tiny_llama(len(tok), layers=2, hidden=64).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    settings = {"clients": 4, "rounds": 2, "local_steps": 4, "seq_len": 32, "rank": 4, "min_clients": 2,
                "compress": "int8", "lr": 3e-3}
    report = federate(str(tmp_path / "base"), tmp_path / "out", config=settings, kill=(1, 2))
    assert [h["round"] for h in report["history"]] == [0, 1, 2]
    assert len(report["history"][1]["clients"]) == 4 and len(report["history"][2]["clients"]) == 3
    assert [(d["round"], d["name"]) for d in report["dropped"]] == [(2, "client-1")]
    assert "client-1 dropped out" in (tmp_path / "out" / "report.md").read_text()
    assert report["perplexity_after"] < report["perplexity_before"]
    assert report["bytes_up_per_client_round"] > 0 and (tmp_path / "out" / "chart.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["perplexity_after"] == pytest.approx(report["perplexity_after"])
    from leanlm.models.load import load_model

    load_model(tmp_path / "out" / "model", "cpu")  # the merged model loads like any leanlm output
    assert not (tmp_path / ".out.federate").exists()
