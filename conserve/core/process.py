"""The engine core: its own process, running the engine loop.

The API process sends requests and aborts through a pipe; the core answers with one message per
engine step holding every streaming request's new tokens and text (a request that does not
stream gets its first token, then everything else when it finishes). HTTP parsing,
tokenization and streaming happen in the API process, so they never stall an iteration.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from conserve.config import EngineConfig
from conserve.core.messages import (
    Abort,
    AddRequest,
    Door,
    Failed,
    Ready,
    Rejected,
    RequestDelta,
    SeqDelta,
    Shutdown,
    Stats,
)
from conserve.engine.output import RequestOutput
from conserve.engine.request import RequestClass
from conserve.engine.stats import StepObserver, StepRecord

if TYPE_CHECKING:
    from conserve.engine.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class _Sent:
    # Characters held back while a stop string could still be forming at the end of the text
    # (it would be cut from the output once complete): longest stop string - 1.
    holdback: int = 0
    # Without streaming the API process needs only the first token (it ends the request's
    # time in the queue) and the end; the deltas between are merged into the last one.
    stream: bool = True
    text_len: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)
    offline: bool = False


# Offline outputs are passed on while no online request is running or waiting, at most every
# OFFLINE_INTERVAL_S, each request's tokens of those steps merged into one delta; while online
# work lasts they are held, for at most OFFLINE_HOLD_S. Passing outputs on wakes the API
# process (text to HTTP streams or the batch store) and the clients that read them, and on a
# CPU that work runs on the cores the next step needs: measured on a 2-core Xeon beside 240
# offline decode streams (docs/co-serving.md), an online prefill right after a full offline
# step ran 2.6x its predicted time at the median (up to 8x) when that step's outputs went out
# at once, and one-row online decode steps took 40-100 ms instead of 13 while a merged burst
# was being sent. Offline work has no latency objective; its streams arrive in bursts.
OFFLINE_INTERVAL_S = 0.5
OFFLINE_HOLD_S = 2.0
# And for ONLINE_QUIET_S after the last online output: the step that ends an online request is
# followed at once by an offline step, and releasing the held burst with it put the API
# process and the offline clients on the cores while the online client read its last token.
# Beside 240 offline decode streams (AMD EPYC, 2 cores) that token reached the client a
# median 8.8 ms (P90 19 ms) after its step, against 4.2-4.5 ms (P90 6-8 ms) alone.
ONLINE_QUIET_S = 0.1


def delta_of(out: RequestOutput, sent: _Sent) -> RequestDelta:
    """The part of `out` not sent yet (and advance `sent`)."""
    if not sent.text_len:
        n = len(out.outputs)
        sent.text_len, sent.tokens, sent.logprobs = [0] * n, [0] * n, [0] * n
    seqs = []
    for c in out.outputs:
        i = c.index
        lp = None
        if c.logprobs is not None:
            lp = c.logprobs[sent.logprobs[i] :]
            sent.logprobs[i] = len(c.logprobs)
        end = len(c.text) if c.finished else max(sent.text_len[i], len(c.text) - sent.holdback)
        seqs.append(
            SeqDelta(
                i,
                c.text[sent.text_len[i] : end],
                c.token_ids[sent.tokens[i] :],
                lp,
                c.finish_reason,
                c.stop_reason,
            )
        )
        sent.text_len[i], sent.tokens[i] = end, len(c.token_ids)
    return RequestDelta(
        out.request_id,
        seqs,
        out.finished,
        len(out.prompt_token_ids),
        out.num_cached_tokens,
        out.num_generated_tokens,
    )


class StepCollector(StepObserver):
    """Step times, stopped steps and predictions since the last `Stats` message (bounded)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.step_times: deque[float] = deque(maxlen=limit)
        self.layer_preemptions: deque[tuple[float, int]] = deque(maxlen=limit)
        self.step_predictions: deque[tuple[float, float]] = deque(maxlen=limit)

    def on_step_end(self, record: StepRecord) -> None:
        if record.stopped_at_layer is not None:
            self.layer_preemptions.append((record.stop_wait_s or 0.0, record.stopped_at_layer))
            return
        self.step_times.append(record.run_s)
        if record.batch.predicted_s is not None:
            self.step_predictions.append((record.batch.predicted_s, record.run_s))

    @staticmethod
    def _drain(d: deque) -> list:
        out = list(d)
        d.clear()
        return out


def engine_stats(engine: Engine, steps: StepCollector) -> Stats:
    try:
        engine.check_integrity()
        integrity = None
    except AssertionError as e:
        integrity = str(e)
    st = engine.stats()
    host = st.host
    kv_tiers = {
        "checkpointed_blocks": host.blocks_checkpointed if host else 0,
        "restored_blocks": host.blocks_restored if host else 0,
        "recomputed_tokens": st.tokens_recomputed,
        "restored_tokens": st.tokens_restored,
    }
    return Stats(
        st.running,
        st.waiting,
        st.kv.usage,
        st.kv.request_tables,
        st.by_class,
        st.num_preemptions,
        st.kv.prefix_queries,
        st.kv.prefix_hits,
        steps._drain(steps.step_times),
        integrity,
        st.preemptions_by_kind(),
        steps._drain(steps.layer_preemptions),
        steps._drain(steps.step_predictions),
        kv_tiers,
        st.shared_prefix_waits,
        aborted_by_class=st.aborted_by_class,
        online_objectives=st.objectives,
        online_busy_s=st.harvest.online_busy_s,
        offline_only_busy_s=st.harvest.offline_only_busy_s,
        offline_only_tokens=st.harvest.offline_only_tokens,
        offline_computed_tokens=st.harvest.offline_computed_tokens,
        host_kv_usage=1 - host.free_blocks / host.num_blocks if host and host.num_blocks else 0.0,
    )


def _read_pipe(conn: Connection, inbox: queue.SimpleQueue, engine: Any) -> None:
    """Receive messages while the main thread computes, each put in the inbox with the time it
    arrived. An arriving online request may stop the running step at its next safepoint
    (layer-wise preemption)."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            inbox.put((Shutdown(), time.monotonic()))
            return
        arrived = time.monotonic()
        if isinstance(msg, AddRequest) and msg.request_class is RequestClass.ONLINE:
            engine.announce_online(len(msg.prompt_token_ids))
        elif isinstance(msg, Door):
            engine.door(msg.open)
        inbox.put((msg, arrived))  # a Door too: it wakes a loop waiting at an open door
        if isinstance(msg, Shutdown):
            return


def run_core(config: EngineConfig, conn: Connection) -> None:
    """Process entry point: build the engine, then serve the pipe until Shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when to stop
    serve_core(config, conn)


def serve_core(config: EngineConfig, conn: Any) -> None:
    """Build the engine, then serve `conn` (a pipe end, or anything with its `send` and
    `recv`) until Shutdown. Runs in any thread."""
    try:
        from conserve.engine.engine import Engine

        engine = Engine.from_config(config)
    except Exception as e:  # noqa: BLE001 - report any start-up failure to the API process
        conn.send(Failed(f"{type(e).__name__}: {e}"))
        return
    # What start-up made (the model, the tokenizer's tables) lives as long as the process: out
    # of the garbage collector's sight, a full collection while serving does not walk it.
    gc.collect()
    gc.freeze()
    _CoreLoop(engine, conn).run()


class _CoreLoop:
    """The engine loop of the core process: take in messages, step, send the deltas."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.steps = StepCollector()
        engine.add_observer(self.steps)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sent: dict[str, _Sent] = {}
        self.held: list[RequestDelta] = []  # offline deltas held back (OFFLINE_HOLD_S)
        self.held_since = 0.0
        self.online_sent_at = float("-inf")  # when online deltas were last sent

    def run(self) -> None:
        engine = self.engine
        slo = engine.slo
        self.conn.send(
            Ready(
                engine.model_name,
                engine.max_model_len,
                engine.config.cache.num_blocks,
                engine.policy.name,
                None if slo is None else slo.tpot,
                None if slo is None else slo.ttft,
                engine.model_config,
                engine.config.dtype,
                engine.config.device,
                None if slo is None else slo.slack,
                None if engine.latency is None else json.dumps(engine.latency.to_json()),
            )
        )
        threading.Thread(
            target=_read_pipe, args=(self.conn, self.inbox, engine), name="core-pipe", daemon=True
        ).start()
        while True:
            # Block only when there is nothing to compute.
            if self.held and not engine.has_unfinished():
                self._flush()
            # With work to do, wait only at an open door: while a request of unknown class is
            # read, offline work would be stopped again at once.
            wait = engine.door_wait() if engine.has_unfinished() else None
            if not self._take_messages(block=wait != 0.0, timeout=wait):
                return
            if engine.has_unfinished():
                self._step()

    def _take_messages(self, block: bool, timeout: float | None = None) -> bool:
        """Handle what has arrived (waiting for one message if `block`, for at most `timeout`
        seconds if given); False on Shutdown."""
        while True:
            try:
                msg, arrived = self.inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return True
            block = False
            if isinstance(msg, Shutdown):
                return False
            if isinstance(msg, AddRequest):
                self._add(msg, arrived)
            elif isinstance(msg, Abort):
                for rid in msg.request_ids:
                    self.engine.abort(rid)
                    self.sent.pop(rid, None)
                gone = set(msg.request_ids)
                self.held = [d for d in self.held if d.request_id not in gone]
            elif msg == "stats":
                self.conn.send(engine_stats(self.engine, self.steps))

    def _add(self, msg: AddRequest, arrived: float) -> None:
        if msg.request_class is RequestClass.ONLINE:
            self.engine.online_received()
        try:
            self.engine.add_request(
                msg.request_id,
                msg.prompt_token_ids,
                msg.params,
                msg.request_class,
                msg.stream,
                arrived,
                api_times=None if msg.sent is None else (msg.received, msg.sent),
            )
        except ValueError as e:
            self.conn.send(Rejected(msg.request_id, str(e)))
            return
        holdback = max(map(len, msg.params.stop), default=1) - 1
        offline = msg.request_class is RequestClass.OFFLINE
        self.sent[msg.request_id] = _Sent(holdback=holdback, stream=msg.stream, offline=offline)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # noqa: BLE001 - a crashed step must not hang the clients silently
            self.conn.send(Failed("engine step failed:\n" + traceback.format_exc()))
            raise
        deltas, offline = [], []
        for out in outputs:
            state = self.sent.get(out.request_id)
            if state is None or (not state.stream and state.text_len and not out.finished):
                continue
            (offline if state.offline else deltas).append(delta_of(out, state))
            if out.finished:
                del self.sent[out.request_id]
        now = time.monotonic()
        if deltas:  # online output leaves at once, in a message of its own
            self.conn.send(deltas)
            self.online_sent_at = now
        if offline:
            if not self.held:
                self.held_since = now
            self.held += offline
        if self.held:
            age = now - self.held_since
            quiet = not self.engine.online_pending() and now - self.online_sent_at >= ONLINE_QUIET_S
            if age > OFFLINE_HOLD_S or (age >= OFFLINE_INTERVAL_S and quiet):
                self._flush()

    def _flush(self) -> None:
        """Send the offline deltas held back."""
        held, self.held = self.held, []
        self.conn.send(merge_deltas(held))


def merge_deltas(deltas: list[RequestDelta]) -> list[RequestDelta]:
    """One delta per request (in the order of their first delta): texts, tokens and logprobs
    joined, the finish state and counts of the last one."""
    merged: dict[str, RequestDelta] = {}
    for d in deltas:
        m = merged.get(d.request_id)
        if m is None:  # a copy: the deltas given are left as they are
            seqs = [
                replace(s, token_ids=list(s.token_ids), logprobs=_copy(s.logprobs)) for s in d.seqs
            ]
            merged[d.request_id] = replace(d, seqs=seqs)
            continue
        seqs = {s.index: s for s in m.seqs}
        for s in d.seqs:
            old = seqs.get(s.index)
            if old is None:
                m.seqs.append(s)
                seqs[s.index] = s
                continue
            old.text += s.text
            old.token_ids += s.token_ids
            if s.logprobs is not None:
                old.logprobs = (old.logprobs or []) + s.logprobs
            old.finish_reason, old.stop_reason = s.finish_reason, s.stop_reason
        m.finished = d.finished
        m.num_cached_tokens, m.num_generated_tokens = d.num_cached_tokens, d.num_generated_tokens
    return list(merged.values())


def _copy(logprobs: list[Any] | None) -> list[Any] | None:
    return None if logprobs is None else list(logprobs)


def start_core(config: EngineConfig) -> tuple[mp.process.BaseProcess, Connection]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=run_core, args=(config, child), name="conserve-engine-core", daemon=True
    )
    proc.start()
    child.close()
    log.info("engine core started, pid %d (api pid %d)", proc.pid, os.getpid())
    return proc, parent
