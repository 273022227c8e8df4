"""Real `leanlm serve` processes on loopback ports, for the server's tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                 "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
                 "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_chat_model(path: Path, layers: int = 2, hidden: int = 64) -> Path:
    """The tests' tiny Llama with a chat template that, like real ones, refuses roles it does not know."""
    from tests.conftest import build_tokenizer, tiny_llama

    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model = tiny_llama(len(tok), layers=layers, hidden=hidden)
    model.generation_config.eos_token_id = None  # a random model should run to max_tokens, as tests expect
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Server:
    def __init__(self, args: list[str], log: Path, port: int | None = None, wait: bool = True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "leanlm", "serve", *args, "--port", str(self.port)],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"leanlm serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"leanlm serve was not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss
