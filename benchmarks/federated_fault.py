"""A deployed federation (separate processes on loopback) in which one client's machine dies mid-round.

`leanlm federate server` and three `leanlm federate client` processes, each on its own data directory; in
round 2, once training has started, the third client's whole process group (wrapper, Flower SuperNode,
SuperExec, ClientApp) is killed with SIGKILL, as a power cut would. Expected: round 2 completes with the two
that remain (min_clients 2), the run finishes, the report names the client that dropped and in which round,
and the surviving clients exit cleanly. Uses a tiny Llama (the fault handling, not quality, is measured;
the CI test `test_a_deployed_federation_of_separate_processes` runs the same path without the kill).

    python benchmarks/federated_fault.py [--json benchmarks/results/federated_fault.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEANLM = [sys.executable, "-c", "import sys; from leanlm.cli import main; sys.exit(main())"]


def setup(tmp: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from leanlm.federate.data import builtin_topics
    from tests.conftest import build_tokenizer, tiny_llama

    tok = build_tokenizer()
    tiny_llama(len(tok), layers=2, hidden=64).save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    topics = builtin_topics()
    for name, part in (("hospital", topics[:15]), ("bank", topics[25:40]), ("school", topics[45:60])):
        (tmp / name).mkdir()
        (tmp / name / "notes.txt").write_text("\n\n".join(part))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def next_round(work: Path) -> int:
    try:
        return json.loads((work / "state.json").read_text())["next_round"]
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="benchmarks/results/federated_fault.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        setup(tmp)
        port, out = free_port(), tmp / "out"
        server = subprocess.Popen(LEANLM + ["federate", "server", str(tmp / "base"), "--clients", "3", "--min-clients",
                                            "2", "--rounds", "3", "--local-steps", "20", "--seq-len", "32", "--rank",
                                            "4", "--eval-windows", "8", "--port", str(port), "--out", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"))
        clients = {n: subprocess.Popen(LEANLM + ["federate", "client", "--server", f"127.0.0.1:{port}", "--data",
                                                 str(tmp / n), "--model", str(tmp / "base")],
                                       stdout=open(tmp / f"{n}.log", "w"), stderr=subprocess.STDOUT,
                                       start_new_session=True)
                   for n in ("hospital", "bank", "school")}
        start = time.monotonic()
        while next_round(tmp / ".out.federate") < 2 and time.monotonic() - start < 600:
            time.sleep(2)
        time.sleep(5)  # round 2's training is under way
        killed_at = time.monotonic() - start
        os.killpg(clients["school"].pid, signal.SIGKILL)
        server.wait(timeout=1200)
        finished_at = time.monotonic() - start
        exits = {n: p.wait(timeout=120) for n, p in clients.items() if n != "school"}
        report = json.loads((out / "report.json").read_text()) if out.exists() else {}
        rounds = [{"round": h["round"], "updates": len(h.get("clients", [])), "dropped": h.get("dropped", []),
                   "seconds": h.get("seconds")} for h in report.get("history", [])]
        result = {"server_exit": server.returncode, "client_exits": exits, "killed": "school",
                  "killed_at_s": killed_at, "finished_at_s": finished_at, "rounds": rounds,
                  "report_says": [line for line in (out / "report.md").read_text().splitlines() if "dropped out" in line]
                  if out.exists() else [], "date": time.strftime("%Y-%m-%d")}
    print(f"server exit {result['server_exit']}, surviving clients' exits {exits}; killed 'school' at "
          f"{killed_at:.0f} s, run finished at {finished_at:.0f} s")
    print(f"{'round':>5} {'updates':>7} {'seconds':>8}  dropped")
    for r in rounds:
        print(f"{r['round']:>5} {r['updates']:>7} {r['seconds'] or 0:>8.0f}  "
              + "; ".join(f"{d['name']}: {d['why']}" for d in r["dropped"]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
