"""Which replica runs a request. Pure bookkeeping: no Ray, no I/O, so it is tested with plain
numbers.

- Online requests go to the replica with the lowest predicted time to first token: a prefill of
  the online prompt tokens already waiting there plus this prompt, beside a decode of the online
  sequences it runs, priced by that replica's latency model (its profile). Offline work does not
  count: the conserve policy stops it for online arrivals.
- Offline requests (and batch lines) follow prefix affinity: the replica that last took the
  longest run of the same leading KV blocks, so that its prefix cache keeps hitting, unless its
  offline load exceeds the least loaded replica's by more than a margin; then the least loaded
  one takes it and becomes the home of that prefix. A batch in planned (depth-first) order thus
  splits into subtrees across replicas: each new subtree starts where the load is lowest, and
  its lines follow it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from conserve.engine.latency import BatchShape, LatencyModel
from conserve.engine.request import RequestClass

DECODE_CONTEXT = 512  # assumed context of a running online sequence in the TTFT prediction


@dataclass
class ReplicaLoad:
    """What the front door knows of one replica's work (it routed all of it)."""

    up: bool = True
    online_queued_tokens: int = 0  # prompt tokens of online requests without a first token yet
    online_running: int = 0  # online requests in flight
    offline_in_flight: int = 0
    model: LatencyModel | None = None
    routed: dict[str, int] = field(default_factory=lambda: {"online": 0, "offline": 0})


class Router:
    def __init__(
        self,
        loads: list[ReplicaLoad],
        block_size: int,
        max_blocks: int = 64,
        min_margin: int = 4,
        margin_share: float = 0.25,
        max_keys: int = 200_000,
    ) -> None:
        self.loads = loads
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.min_margin, self.margin_share = min_margin, margin_share
        self.max_keys = max_keys
        self._homes: OrderedDict[int, int] = OrderedDict()  # prefix key -> replica
        self._turn = 0  # rotates ties

    def up(self) -> list[int]:
        return [i for i, r in enumerate(self.loads) if r.up]

    def pick(self, klass: RequestClass, prompt: list[int]) -> int | None:
        """The replica for a request; None when no replica is up."""
        candidates = self._rotated(self.up())
        if not candidates:
            return None
        if klass is RequestClass.ONLINE:
            choice = min(candidates, key=lambda i: self.predicted_ttft(i, len(prompt)))
        else:
            choice = self._offline(candidates, prompt)
        self.loads[choice].routed[klass.value] += 1
        return choice

    def _rotated(self, idx: list[int]) -> list[int]:
        if not idx:
            return idx
        self._turn = (self._turn + 1) % len(idx)
        return idx[self._turn :] + idx[: self._turn]

    def predicted_ttft(self, i: int, prompt_len: int) -> float:
        r = self.loads[i]
        tokens = r.online_queued_tokens + prompt_len
        if r.model is None:  # no profile: compare work in tokens
            return float(tokens + r.online_running)
        shape = BatchShape()
        shape.add(0, tokens)
        for _ in range(r.online_running):
            shape.add(DECODE_CONTEXT, 1)
        return r.model.predict(shape)

    def prefix_keys(self, prompt: list[int]) -> list[int]:
        """One key per full leading block, each naming the whole prefix up to its end."""
        keys, h, bs = [], 0, self.block_size
        for b in range(min(len(prompt) // bs, self.max_blocks)):
            h = hash((h, tuple(prompt[b * bs : (b + 1) * bs])))
            keys.append(h)
        return keys

    def _offline(self, candidates: list[int], prompt: list[int]) -> int:
        keys = self.prefix_keys(prompt)
        home = None
        for k in reversed(keys):  # the longest prefix with a home that is up
            r = self._homes.get(k)
            if r is not None and self.loads[r].up:
                home = r
                break
        least = min(candidates, key=lambda i: self.loads[i].offline_in_flight)
        choice = least
        if home is not None:
            mean = sum(self.loads[i].offline_in_flight for i in candidates) / len(candidates)
            margin = max(self.min_margin, self.margin_share * mean)
            if self.loads[home].offline_in_flight - self.loads[least].offline_in_flight <= margin:
                choice = home
        for k in keys:
            self._homes[k] = choice
            self._homes.move_to_end(k)
        while len(self._homes) > self.max_keys:
            self._homes.popitem(last=False)
        return choice
