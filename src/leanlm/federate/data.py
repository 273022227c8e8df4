"""Each client's text: its own directory (a real deployment: data never leaves it), or the built-in corpus
dealt to N clients. `topic` gives each client a contiguous run of the manual's topics (sorted keys), so
clients know different things (non-IID, on purpose); `iid` deals the same topics round-robin, for
comparison. Every client keeps its last `holdout` share for evaluation: locally, and pooled centrally."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leanlm.data.corpus import read_text
from leanlm.errors import DataError


@dataclass
class ClientText:
    name: str
    train: str
    holdout: str


def builtin_topics() -> list[str]:
    """The built-in corpus' training topics (the first 90% of the sorted keys): the manual's last topics are
    everyone's evaluation data elsewhere in leanlm, and stay unseen here too."""
    from pydoc_data import topics

    keys = sorted(topics.topics)
    return [topics.topics[k] for k in keys[: int(len(keys) * 0.9)]]


def split_topics(texts: list[str], clients: int, how: str) -> list[list[str]]:
    if len(texts) < clients:
        raise DataError(f"{len(texts)} topics cannot be dealt to {clients} clients; use fewer clients")
    if how == "iid":
        return [texts[i::clients] for i in range(clients)]
    bounds = [round(i * len(texts) / clients) for i in range(clients + 1)]
    return [texts[bounds[i]:bounds[i + 1]] for i in range(clients)]


def hold_out(name: str, texts: list[str], share: float) -> ClientText:
    """The last `share` of each topic (by characters) held out, so the held-out text covers what was trained."""
    train, held = [], []
    for t in texts:
        cut = int(len(t) * (1 - share))
        train.append(t[:cut])
        held.append(t[cut:])
    return ClientText(name, "\n\n".join(train), "\n\n".join(held))


def client_texts(data: list[str] | None, clients: int, split: str, holdout: float) -> list[ClientText]:
    """One ClientText per client: from `data` (one directory or file per client) or the built-in corpus."""
    if not data:
        parts = split_topics(builtin_topics(), clients, split)
        return [hold_out(f"client-{i}", part, holdout) for i, part in enumerate(parts)]
    out = []
    for i, source in enumerate(data):
        path = Path(source).expanduser()
        try:
            text = read_text(path)
        except DataError as err:
            raise DataError(f"client {i} ({path}): {err}") from None
        except OSError as err:
            raise DataError(f"client {i}: cannot read {path} ({err.strerror})") from None
        if not text.strip():
            raise DataError(f"client {i}: {path} holds no text")
        out.append(hold_out(f"client-{i} ({path.name})", [text], holdout))
    return out
