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
    # a LoRA pair: wide A, tall B. Tall B gets one scale per column, so scales cost almost nothing
    lora = {"A": rng.standard_normal((4, 256)).astype(np.float32), "B": rng.standard_normal((256, 4)).astype(np.float32)}
    sent, _ = wire_ops.encode(lora, "int8")
    assert sent["B.scale"].shape == (4,) and wire_ops.nbytes(sent) < wire_ops.nbytes(lora) / 3.9
    back = wire_ops.decode(sent, "int8", {k: v.shape for k, v in lora.items()})
    assert all(np.abs(back[k] - lora[k]).max() <= np.abs(lora[k]).max() / 127 for k in lora)
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore")
def test_a_deployed_federation_of_separate_processes(tmp_path):
    """`leanlm federate server` (a Flower SuperLink) and two `leanlm federate client` processes (SuperNodes), each
    with its own data directory, on loopback: the rounds run, the clients exit when the run is over, and a
    client whose server does not answer gives up with a message saying so."""
    pytest.importorskip("flwr")
    import subprocess
    import sys

    from leanlm.federate.data import builtin_topics
    from leanlm.federate.deploy import join_federation
    from leanlm.federate.config import FederateError
    from tests.conftest import build_tokenizer, tiny_llama

    tok = build_tokenizer()
    tiny_llama(len(tok), layers=2, hidden=64).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    topics = builtin_topics()
    for name, part in (("hospital", topics[:15]), ("bank", topics[40:55])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("\n\n".join(part))
    port = _free_port()
    leanlm = [sys.executable, "-c", "import sys; from leanlm.cli import main; sys.exit(main())"]
    server = subprocess.Popen(leanlm + ["federate", "server", str(tmp_path / "base"), "--clients", "2", "--min-clients",
                                        "2", "--rounds", "2", "--local-steps", "2", "--seq-len", "32", "--rank", "4",
                                        "--lr", "3e-3", "--eval-windows", "8", "--port", str(port),
                                        "--eval-data", str(tmp_path / "bank"), "--out", str(tmp_path / "out")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen(leanlm + ["federate", "client", "--server", f"127.0.0.1:{port}", "--data",
                                          str(tmp_path / name), "--model", str(tmp_path / "base"), "--retries", "30",
                                          "--wait", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name in ("hospital", "bank")]
    try:
        out, _ = server.communicate(timeout=420)
        assert server.returncode == 0, out[-3000:]
        for c in clients:
            said, _ = c.communicate(timeout=60)
            assert c.returncode == 0 and "finished its run" in said, said[-2000:]
    finally:
        for p in [server, *clients]:
            p.kill()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["deployed"] and sorted(report["clients"]) == ["bank", "hospital"]
    assert [h["round"] for h in report["history"]] == [0, 1, 2]
    assert all(len(h["clients"]) == 2 for h in report["history"][1:])
    assert report["history"][-1]["central_loss"] < report["history"][0]["central_loss"]
    assert report["evaluated_on"] == "the server's eval text" and report["perplexity_after"] is not None
    assert not (tmp_path / ".out.federate").exists()
    with pytest.raises(FederateError, match="did not answer"):
        join_federation(f"127.0.0.1:{_free_port()}", str(tmp_path / "bank"), retries=2, wait=5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="client 0 .*empty.*holds no"):
        join_federation(f"127.0.0.1:{port}", str(tmp_path / "empty"))


@pytest.mark.filterwarnings("ignore")
def test_a_stopped_run_resumes_from_its_last_round(tmp_path):
    """Round 2 loses a client below min_clients, so the run stops after round 1 and says how to go on; --resume
    continues at round 2 from the checkpoint (round 1 is not run again) and finishes."""
    pytest.importorskip("flwr")
    from leanlm.federate import federate
    from leanlm.federate.config import FederateError
    from tests.conftest import build_tokenizer, tiny_llama

    tok = build_tokenizer()
    tiny_llama(len(tok), layers=2, hidden=64).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    settings = {"clients": 2, "rounds": 2, "local_steps": 2, "seq_len": 32, "rank": 4, "min_clients": 2,
                "eval_windows": 8, "freeze_a": True}
    with pytest.raises(FederateError, match="stopped after round 1 of 2.*--resume"):
        federate(str(tmp_path / "base"), tmp_path / "out", config=settings, kill=(1, 2))
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.federate" / "state.json").exists()
    # FFA-LoRA: only the B matrices are trained, exchanged and checkpointed
    keys = list(np.load(tmp_path / ".out.federate" / "adapter.npz"))
    assert keys and all("lora_B" in k for k in keys)
    first = json.loads((tmp_path / ".out.federate" / "state.json").read_text())["history"]
    with pytest.raises(ConfigError, match="other settings"):
        federate(str(tmp_path / "base"), tmp_path / "out", config={**settings, "rounds": 3}, resume=True)
    report = federate(str(tmp_path / "base"), tmp_path / "out", config=settings, resume=True)
    assert [h["round"] for h in report["history"]] == [0, 1, 2]
    assert report["history"][1] == first[1]  # round 1 came from the checkpoint, not a second run
    assert len(report["history"][2]["clients"]) == 2 and not (tmp_path / ".out.federate").exists()


@pytest.mark.filterwarnings("ignore")
def test_the_federated_recipe_step_trains_a_quantized_model_in_place(tmp_path):
    """A recipe quantizes to int4, then runs federated QLoRA on that model; the merged, requantized weights go
    back into the recipe's model, which is saved and loads like any leanlm output."""
    pytest.importorskip("flwr")
    from leanlm.cli import main
    from tests.conftest import build_tokenizer, tiny_llama

    tok = build_tokenizer()
    tiny_llama(len(tok), layers=2, hidden=64).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    recipe = tmp_path / "fed.yaml"
    recipe.write_text("name: fed\ncalibration: {samples: 4, length: 32}\nsteps:\n"
                      "  - {type: rtn, bits: 4, group_size: 32}\n"
                      "  - {type: federated, clients: 2, rounds: 1, local_steps: 3, seq_len: 32, rank: 4, "
                      "eval_windows: 8, lr: 0.003, compress: int8}\n")
    out = tmp_path / "out"
    assert main(["optimize", str(tmp_path / "base"), "--recipe", str(recipe), "--out", str(out), "--no-bench"]) == 0
    stats = json.loads((out / "report.json").read_text())["steps"][1]["stats"]
    assert stats["quantized_base"] and stats["rounds"] == 1 and len(stats["clients"]) == 2
    assert stats["perplexity_adapter"] < stats["perplexity_before"] and stats["perplexity_after"] is not None
    assert "int4" in (out / "model" / "leanlm.json").read_text()
