"""The prefix (KV) cache of the leanlm backend: the keys and values of prompts already run, kept in a tree of
token blocks (as vLLM's automatic prefix caching and SGLang's RadixAttention keep them), so a request
that starts with a cached prefix (a shared system prompt, few-shot examples, the earlier turns of its
chat) copies that prefix's KV into its row and prefills only the rest.

A node is one block of `block` tokens under the blocks before it; its KV is one tensor
[layers, 2, kv_heads, block, head_dim]. Only whole blocks are kept, and a match always leaves at least
one prompt token to run, since the first answer token needs the logits of the prompt's last one. Past
`budget_bytes`, the least recently used leaves go first (a parent outlives its children, so a shared
system prompt stays while the conversations under it come and go).
"""

from __future__ import annotations

import itertools

import torch

from leanlm.serve.kv_slots import SlotCache


class Node:
    __slots__ = ("parent", "key", "kv", "children", "used")

    def __init__(self, parent: Node | None, key: tuple[int, ...], kv: torch.Tensor | None):
        self.parent, self.key, self.kv = parent, key, kv
        self.children: dict[tuple[int, ...], Node] = {}
        self.used = 0


class PrefixCache:
    def __init__(self, block: int = 32, budget_bytes: int = 1 << 30):
        self.block, self.budget = block, budget_bytes
        self.root = Node(None, (), None)
        self.bytes = 0
        self.nodes = 0
        self._clock = itertools.count(1)
        self.hit_tokens = self.asked_tokens = 0

    def _blocks(self, ids: list[int], limit: int) -> list[tuple[int, ...]]:
        b = self.block
        return [tuple(ids[i:i + b]) for i in range(0, limit - limit % b, b)]

    def match(self, ids: list[int]) -> list[Node]:
        """The cached blocks `ids` starts with (leaving at least its last token to be run)."""
        path, node = [], self.root
        stamp = next(self._clock)
        for key in self._blocks(ids, len(ids) - 1):
            node = node.children.get(key)
            if node is None:
                break
            node.used = stamp
            path.append(node)
        self.asked_tokens += len(ids)
        self.hit_tokens += len(path) * self.block
        return path

    def load(self, path: list[Node], cache: SlotCache, row: int) -> int:
        """Copy the matched blocks' KV into `row`; the number of tokens now there."""
        if not path:
            return 0
        cache.ensure(len(path) * self.block)
        kv = torch.cat([n.kv for n in path], dim=3)  # [layers, 2, kv_heads, tokens, head_dim]
        tokens = kv.shape[3]
        for layer in range(cache.layers):
            cache.keys[layer][row, :, :tokens] = kv[layer, 0]
            cache.values[layer][row, :, :tokens] = kv[layer, 1]
        cache.lengths[row] = tokens
        return tokens

    def store(self, ids: list[int], cache: SlotCache, row: int) -> None:
        """Keep the whole blocks of `ids` (whose KV `row` holds) that the tree lacks."""
        node, stamp = self.root, next(self._clock)
        for i, key in enumerate(self._blocks(ids, min(len(ids), cache.lengths[row]))):
            child = node.children.get(key)
            if child is None:
                start, stop = i * self.block, (i + 1) * self.block
                kv = torch.stack([torch.stack([cache.keys[layer][row, :, start:stop], cache.values[layer][row, :, start:stop]])
                                  for layer in range(cache.layers)]).clone()
                child = node.children[key] = Node(node, key, kv)
                self.bytes += kv.numel() * kv.element_size()
                self.nodes += 1
            child.used = stamp
            node = child
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.budget:
            leaves = [n for n in self._walk() if not n.children]
            if not leaves:
                return
            victim = min(leaves, key=lambda n: n.used)
            del victim.parent.children[victim.key]
            self.bytes -= victim.kv.numel() * victim.kv.element_size()
            self.nodes -= 1

    def _walk(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def clear(self) -> None:
        self.root.children.clear()
        self.bytes = self.nodes = 0

    def stats(self) -> dict:
        return {"blocks": self.nodes, "bytes": self.bytes, "hit_tokens": self.hit_tokens,
                "asked_tokens": self.asked_tokens}
