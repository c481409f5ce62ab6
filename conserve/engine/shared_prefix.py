"""Waits for shared prompt blocks that another request is computing right now.

Requests that start together and share a long prompt prefix (lines of a batch job asking about
one document) would each compute it, since no block of it is in the prefix cache yet. Instead,
the prompt blocks a running request is computing are registered here by their hash; a waiting
request whose prompt continues into them (at least SHARED_PREFIX_MIN_BLOCKS of them, right
after its prefix-cache hit) is passed over until they are cached, and then computes only the
rest.
"""

from __future__ import annotations

from conserve.engine.request import Request, RequestClass, RequestStatus
from conserve.kv.block_pool import BlockHash
from conserve.kv.manager import KVCacheManager, PrefixHit

# the shortest run of shared blocks worth waiting for
SHARED_PREFIX_MIN_BLOCKS = 4


class SharedPrefixWaits:
    """Full prompt blocks that running requests are computing: block hash -> the request
    computing it, and each request's hashes."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self._computing: dict[BlockHash, Request] = {}
        self._computing_of: dict[str, list[BlockHash]] = {}

    def _prompt_blocks(self, request: Request) -> int:
        """Full prompt blocks a prefix hit or a later request can share (one token is always
        left to compute)."""
        return (request.num_prompt_tokens - 1) // self.kv.block_size

    def should_wait(self, request: Request, prefix: PrefixHit) -> bool:
        """Whether the prompt blocks of `request` right after `prefix` are being computed by
        running requests, at least SHARED_PREFIX_MIN_BLOCKS of them (first admissions only; an
        online request waits only for online ones)."""
        if not self._computing or request.status != RequestStatus.WAITING:
            return False
        first = len(prefix.block_ids)
        last = min(self._prompt_blocks(request), first + SHARED_PREFIX_MIN_BLOCKS)
        if last - first < SHARED_PREFIX_MIN_BLOCKS:
            return False
        hashes = self.kv.block_hashes(request.token_ids, last)
        for j in range(first, last):
            owner = self._computing.get(hashes[j])
            if owner is None or owner.status != RequestStatus.RUNNING:
                return False
            if request.request_class is RequestClass.ONLINE and (
                owner.request_class is RequestClass.OFFLINE
            ):
                return False  # offline prefill can be held back: never wait behind it
        return True

    def note(self, request: Request, first: int) -> None:
        """`request` was admitted: register the prompt blocks it will compute from block
        `first` on (those no other running request computes already)."""
        last = self._prompt_blocks(request)
        if last - first < SHARED_PREFIX_MIN_BLOCKS or not self.kv.enable_prefix_caching:
            return
        mine = []
        for h in self.kv.block_hashes(request.token_ids, last)[first:]:
            if h not in self._computing:
                self._computing[h] = request
                mine.append(h)
        if mine:
            self._computing_of[request.request_id] = mine

    def forget(self, request_id: str) -> None:
        """The request's prompt blocks are cached, or it stopped computing them (preempted,
        finished, aborted)."""
        for h in self._computing_of.pop(request_id, ()):
            del self._computing[h]

    @property
    def num_computing(self) -> int:
        """Blocks registered as being computed."""
        return len(self._computing)
