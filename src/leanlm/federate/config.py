"""`leanlm federate`'s settings, one typed config (an unknown key is refused with the valid ones)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from leanlm.core.config import Validated
from leanlm.errors import ConfigError, LeanLMError


class FederateError(LeanLMError):
    """A federated run that could not go on (too few clients, a client on another base model)."""


@dataclass
class FederateConfig(Validated):
    clients: int = 4                 # simulated clients (with `data` directories: one per directory)
    rounds: int = 5
    fraction: float = 1.0            # share of the clients sampled for each round
    min_clients: int = 2             # a round goes ahead with at least this many updates, else the run stops
    split: Literal["topic", "iid"] = "topic"  # how one data set is dealt to the clients
    local_steps: int = 10            # optimizer steps per client per round
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["*"])
    freeze_a: bool = False           # FFA-LoRA (Sun et al., 2024): A stays at its shared seeded init, only B trains
                                     # and travels, so averaging B is exactly averaging the updates; half the bytes
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = 0.01        # FedProx's pull towards the round's global adapter
    server_lr: float = 0.01          # FedAdam's step
    server_step: float = 1.0         # FedAvg/FedProx: the mean update is applied times this (the global step size
                                     # of the FedOpt papers; 1 is plain FedAvg)
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    compress: Literal["none", "int8", "topk"] = "none"  # how a client's update travels
    topk: float = 0.1                # with compress: topk, the share of each tensor's entries sent
    holdout: float = 0.1             # each client's held-out share, evaluated locally and (pooled) centrally
    eval_windows: int = 64           # pooled held-out windows the server scores each round (0: all), spread evenly
    round_timeout: float = 3600.0    # seconds the server waits for a round's replies
    wait_clients: float = 120.0      # seconds a round waits for all `clients` to connect, then goes on with those
                                     # connected if they are at least min_clients
    seed: int = 0

    def validate(self) -> None:
        if self.clients < 1 or self.rounds < 1 or self.local_steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ConfigError("federate needs clients, rounds, local_steps and batch_size >= 1 and seq_len >= 8")
        if not 0 < self.fraction <= 1 or not 0 < self.topk <= 1 or not 0 < self.holdout < 1:
            raise ConfigError(f"fraction and topk must be in (0, 1] and holdout in (0, 1); got fraction "
                              f"{self.fraction}, topk {self.topk}, holdout {self.holdout}")
        if self.min_clients < 1 or self.min_clients > self.clients:
            raise ConfigError(f"min_clients is {self.min_clients} but there are {self.clients} clients: a round "
                              "could never go ahead; lower min_clients or add clients")
        if round(self.clients * self.fraction) < self.min_clients:
            raise ConfigError(f"fraction {self.fraction} samples {round(self.clients * self.fraction)} of "
                              f"{self.clients} clients a round, fewer than min_clients {self.min_clients}")
        if self.round_timeout <= 0 or self.wait_clients < 0:
            raise ConfigError(f"round_timeout must be > 0 and wait_clients >= 0 seconds, got {self.round_timeout} "
                              f"and {self.wait_clients}")
        if self.eval_windows < 0:
            raise ConfigError(f"eval_windows must be 0 (all) or more, got {self.eval_windows}")
        if self.rank < 1 or self.alpha <= 0 or self.lr <= 0 or self.server_lr <= 0 or self.proximal_mu < 0 \
                or self.server_step <= 0:
            raise ConfigError("LoRA rank >= 1, alpha, lr, server_lr and server_step > 0 and proximal_mu >= 0, please")
