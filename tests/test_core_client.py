"""The API side of the engine core (`core/client.py`) over a fake transport: how step outputs
reach the requests' coroutines."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

from conserve.config import EngineConfig
from conserve.core.client import OFFLINE_DISPATCH_SLICE, EngineClient
from conserve.core.messages import AddRequest, Door, Ready, RequestDelta, SeqDelta
from conserve.engine.request import RequestClass
from conserve.sampling.params import SamplingParams


class FakeTransport:
    """The core's side as a queue the test fills; what the client sends is recorded."""

    def __init__(self) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.sent: list[Any] = []

    def first(self, timeout_s: float) -> Any:
        return Ready("m", 64, 16, "conserve", None, None)

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def recv(self) -> Any:
        msg = self.inbox.get()
        if msg is None:
            raise EOFError
        return msg

    def is_alive(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        return None

    def close(self, timeout_s: float) -> None:
        self.inbox.put(None)

    def kill(self) -> None:
        self.inbox.put(None)


def delta(request_id: str, token: int, finished: bool = False) -> RequestDelta:
    seq = SeqDelta(0, f"<{token}>", [token], None, "length" if finished else None, None)
    return RequestDelta(request_id, [seq], finished, 1, 0, token)


async def _collect(client: EngineClient, rid: str, cls: RequestClass, log: list) -> list[int]:
    tokens = []
    async for d in client.generate(rid, [1], SamplingParams(max_tokens=3), cls, True):
        tokens += d.seqs[0].token_ids
        log.append((rid, d.seqs[0].token_ids[0]))
    return tokens


async def _started(transport: FakeTransport, n: int) -> None:
    while sum(isinstance(m, AddRequest) for m in transport.sent) < n:
        await asyncio.sleep(0.001)


def test_offline_bursts_leave_the_loop_free_and_keep_each_requests_order() -> None:
    """A message of many offline deltas reaches its requests a slice per turn of the event
    loop, so a callback that became ready meanwhile (a socket read) runs before the burst is
    through; every request gets its deltas in order and whole, across messages that overlap."""
    n = 5 * OFFLINE_DISPATCH_SLICE

    async def main() -> None:
        transport = FakeTransport()
        client = EngineClient(EngineConfig(), tokenizer=object(), transport=transport)
        client.start(asyncio.get_running_loop())
        log: list[tuple[str, int]] = []
        off = [f"off-{i}" for i in range(n)]
        tasks = [asyncio.create_task(_collect(client, r, RequestClass.OFFLINE, log)) for r in off]
        await _started(transport, n)
        # two messages back to back: the second must not overtake the first's slices
        transport.inbox.put([delta(r, 1) for r in off])
        transport.inbox.put([delta(r, 2) for r in off])
        probe: list[int] = []
        while len(log) < 2:  # the first message is being dispatched
            await asyncio.sleep(0)
        # the socket read of an arriving request, as the loop would schedule it
        asyncio.get_running_loop().call_soon(lambda: probe.append(len(log)))
        transport.inbox.put([delta(r, 3, True) for r in off])
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert all(t == [1, 2, 3] for t in results)
        assert probe and probe[0] < 2 * n  # ran before the two bursts were through
        client.shutdown()

    asyncio.run(main())


def test_offline_deltas_wait_while_an_online_request_is_in_flight(monkeypatch) -> None:
    """Offline deltas that arrive while an online request runs wait until it has finished
    (its own deltas go at once); they go on anyway after OFFLINE_DEFER_S; none is lost."""
    import conserve.core.client as client_mod

    async def main() -> None:
        transport = FakeTransport()
        client = EngineClient(EngineConfig(), tokenizer=object(), transport=transport)
        client.start(asyncio.get_running_loop())
        log: list[tuple[str, int]] = []
        off = [f"off-{i}" for i in range(20)]
        tasks = [asyncio.create_task(_collect(client, r, RequestClass.OFFLINE, log)) for r in off]
        online = asyncio.create_task(_collect(client, "on", RequestClass.ONLINE, log))
        await _started(transport, 21)
        transport.inbox.put([delta(r, 1) for r in off] + [delta("on", 1)])
        await asyncio.sleep(0.1)
        assert log == [("on", 1)]  # the offline ones wait
        transport.inbox.put([delta("on", 2)] + [delta(r, 2, True) for r in off])
        transport.inbox.put([delta("on", 3, True)])
        assert await asyncio.wait_for(online, 10) == [1, 2, 3]
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert all(t == [1, 2] for t in results)
        assert [r for r, _ in log[:3]] == ["on"] * 3  # every offline delta came after
        # an online request that lasts: the offline deltas go on after OFFLINE_DEFER_S
        monkeypatch.setattr(client_mod, "OFFLINE_DEFER_S", 0.2)
        log.clear()
        late = asyncio.create_task(_collect(client, "late", RequestClass.OFFLINE, log))
        long = asyncio.create_task(_collect(client, "long", RequestClass.ONLINE, log))
        await _started(transport, 23)
        t0 = asyncio.get_running_loop().time()
        transport.inbox.put([delta("late", 1, True), delta("long", 1)])
        assert await asyncio.wait_for(late, 10) == [1]
        waited = asyncio.get_running_loop().time() - t0
        assert waited >= 0.2
        transport.inbox.put([delta("long", 2, True)])
        assert await asyncio.wait_for(long, 10) == [1, 2]
        client.shutdown()

    asyncio.run(main())


def test_offline_deltas_wait_for_a_request_on_its_way_in() -> None:
    """While the HTTP server holds a request it has not classified yet (`hold_offline`, wired
    by `ServerState`), offline deltas wait; once it is classified they go on. The engine core
    is told when the first such request arrives and when none is left (its door)."""
    from types import SimpleNamespace

    from conserve.server.state import ServerState

    async def main() -> None:
        transport = FakeTransport()
        client = EngineClient(EngineConfig(), tokenizer=object(), transport=transport)
        state = ServerState()
        state.client = client  # wires client.hold_offline to the state's count
        client.start(asyncio.get_running_loop())
        log: list[tuple[str, int]] = []
        task = asyncio.create_task(_collect(client, "off", RequestClass.OFFLINE, log))
        await _started(transport, 1)
        request = SimpleNamespace(state=SimpleNamespace())
        other = SimpleNamespace(state=SimpleNamespace())
        state.arrive(request)  # as the server's middleware does for a POST to /v1/
        state.arrive(other)
        transport.inbox.put([delta("off", 1, True)])
        await asyncio.sleep(0.1)
        assert log == []  # waits for the arriving request
        state.classified(request)
        state.classified(request)  # counted once
        assert state.arriving == 1 and log == []
        state.classified(other)
        assert state.arriving == 0
        assert await asyncio.wait_for(task, 10) == [1]
        # the engine's door: opened by the first arrival, closed when the last is classified
        assert [m.open for m in transport.sent if isinstance(m, Door)] == [True, False]
        # ... unless that one is online: its AddRequest, right behind, closes it
        state.arrive(request)
        state.classified(request, online=True)
        assert [m.open for m in transport.sent if isinstance(m, Door)] == [True, False, True]
        client.shutdown()

    asyncio.run(main())
