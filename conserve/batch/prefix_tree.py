"""A compressed prefix tree (radix tree) over the prompts of one batch, at block granularity.

The tree knows tokens, not requests: a node holds a span of tokens and the indices of the lines
whose prompt ends exactly there; what a line asks for (lengths, costs) lives in the planner.

Prompts are compared in blocks of `block_size` tokens, the granularity of the engine's prefix
cache: two prompts that agree on 40 tokens with 16-token blocks share two blocks in the cache,
so they share two blocks here and part from each other at the third. This is also what makes
building fast: each step down the tree is one dict lookup (the next block's bytes) and one slice
comparison done in C, never a Python loop over tokens.

Invariants:
- a node's span is `src[start:end]` of the token array of the line that created it; `start` is
  the depth of the node (tokens from the root) and a multiple of `block_size`;
- a node with children ends at a multiple of `block_size` (a prompt that ends inside a block
  makes a leaf, since any longer prompt has a different, longer block there);
- the children of a node are keyed by the bytes of their first (possibly partial) block, and are
  kept in first-appearance order (dict order; a split keeps the child's place).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence

TOKEN_TYPECODE = "l"  # signed 64-bit on Linux: any vocabulary fits


class Node:
    __slots__ = ("src", "start", "end", "children", "lines")

    def __init__(self, src: array, start: int, end: int) -> None:
        self.src, self.start, self.end = src, start, end
        self.children: dict[bytes, Node] = {}
        self.lines: list[int] = []  # lines whose prompt ends exactly here, in insertion order

    @property
    def num_tokens(self) -> int:
        """Tokens of this node's own span (not counting its ancestors)."""
        return self.end - self.start

    def tokens(self) -> list[int]:
        return self.src[self.start : self.end].tolist()


class PrefixTree:
    def __init__(self, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self.root = Node(array(TOKEN_TYPECODE), 0, 0)
        self.num_lines = 0

    @staticmethod
    def build(prompts: Sequence[Sequence[int]], block_size: int = 16) -> PrefixTree:
        """The tree of `prompts`; line i is prompts[i]."""
        tree = PrefixTree(block_size)
        for i, p in enumerate(prompts):
            tree.insert(i, p)
        return tree

    def _key(self, ids: array, pos: int) -> bytes:
        return ids[pos : pos + self.block_size].tobytes()

    def insert(self, line: int, prompt: Sequence[int]) -> None:
        ids = prompt if isinstance(prompt, array) else array(TOKEN_TYPECODE, prompt)
        node, pos, n = self.root, 0, len(ids)
        while pos < n:
            key = self._key(ids, pos)
            child = node.children.get(key)
            if child is None:
                leaf = Node(ids, pos, n)
                node.children[key] = leaf
                node = leaf
                break
            shared = self._shared(child, ids)
            if shared < child.end:
                child = self._split(node, key, child, shared)
            node, pos = child, shared
        node.lines.append(line)
        self.num_lines += 1

    def _shared(self, child: Node, ids: array) -> int:
        """The depth up to which `ids` agrees with `child`'s span, in whole blocks (a final
        partial block counts only when it is the same partial block). At least one block:
        the caller found the child by its first block."""
        s, e, n, b = child.start, child.end, len(ids), self.block_size
        if e <= n and child.src[s:e] == ids[s:e] and (e == n or e % b == 0):
            return e  # fast path: the whole span matches
        pos = s + b
        while pos < e:
            if child.src[pos : min(pos + b, e)] != ids[pos : min(pos + b, n)]:
                return pos
            pos += b
        return e

    def _split(self, parent: Node, key: bytes, child: Node, at: int) -> Node:
        """Cut `child` at depth `at`: a new node takes the head of the span and `child` keeps
        the tail below it. The new node takes `child`'s place (same key, same position)."""
        head = Node(child.src, child.start, at)
        child.start = at
        head.children[self._key(child.src, at)] = child
        parent.children[key] = head
        return head

    # -- reading ----------------------------------------------------------------------------

    def nodes(self) -> Iterator[tuple[Node, int]]:
        """(node, depth in nodes) in pre-order, children in first-appearance order; iterative,
        so deep trees (long prompts) do not hit the recursion limit."""
        stack = [(self.root, 0)]
        while stack:
            node, depth = stack.pop()
            yield node, depth
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))

    def dfs_lines(self) -> list[int]:
        """Every line once, depth first: a node's own lines before its children's, children
        in first-appearance order. Lines that share a prefix come out next to each other."""
        return [line for node, _ in self.nodes() for line in node.lines]

    def num_nodes(self) -> int:
        return sum(1 for _ in self.nodes())

    def num_tokens(self) -> int:
        """Distinct prompt tokens: what a perfect prefix cache computes for the whole batch."""
        return sum(node.num_tokens for node, _ in self.nodes())
