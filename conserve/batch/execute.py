"""Batch lines run by the engine core: the order hook that plans them, and the `execute`
function that answers each one exactly as its HTTP endpoint would, as an offline request.
Used by the server's Batch API, `conserve batch run` and `conserve bench offline`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from conserve.batch.planner import CostModel, PlannerOptions, hardware_for, make_order
from conserve.batch.prepare import LinePreparation, LineShape, PreparedLine, prepare_line
from conserve.batch.results import LineResult, answered
from conserve.batch.runner import EngineGone, Execute, OrderHook, fcfs
from conserve.batch.validate import BatchLine
from conserve.core.client import EngineClient, EngineDeadError, ReplicaLost
from conserve.core.messages import RequestDelta
from conserve.engine.request import RequestClass
from conserve.openai.answer import answer
from conserve.openai.errors import OpenAIError
from conserve.openai.protocol import UnknownFields

log = logging.getLogger(__name__)

MAX_LINE_ATTEMPTS = 4  # runs of one batch line across lost replicas before the batch stops


class LineHooks(Protocol):
    """What the serving process keeps about the requests it runs (the server's `ServerState`
    is one): the unknown fields already logged, and `track` (admission counts, metrics)."""

    unknown_fields: UnknownFields

    def track(
        self, klass: RequestClass, stream: AsyncIterator[RequestDelta]
    ) -> AsyncIterator[RequestDelta]: ...


class Untracked:
    """The LineHooks of a process that runs nothing but the batch (`conserve batch run`)."""

    def __init__(self) -> None:
        self.unknown_fields = UnknownFields()

    def track(
        self, klass: RequestClass, stream: AsyncIterator[RequestDelta]
    ) -> AsyncIterator[RequestDelta]:
        return stream


def batch_order(
    client: EngineClient,
    name: str,
    peak_tflops: float | None = None,
    bandwidth_gbs: float | None = None,
) -> OrderHook:
    """The runner's order hook `name` (fcfs, dfs, blend) for this engine: every line prepared
    once by the endpoints' own code (its shape plans it, its request runs), costs from the
    served model, its dtype and device."""
    hardware = hardware_for(
        client.device,
        peak_tflops * 1e12 if peak_tflops else None,
        bandwidth_gbs * 1e9 if bandwidth_gbs else None,
    )
    cost = CostModel.for_model(client.model_config, client.dtype, hardware)
    # "blend-inflight" (bench offline's ablation): the dual scan balances the lines in flight
    feedback = name == "blend-inflight"
    options = PlannerOptions(block_size=client.config.cache.block_size, scan_feedback=feedback)
    plan = make_order("blend" if feedback else name, _shape_of, cost, options)
    if plan is fcfs:
        return fcfs  # file order reads no shapes: each line is prepared as it runs

    def order(lines: list[BatchLine]) -> Iterable[BatchLine]:
        return plan([PreparedLine.of(line, prepare_line(client, line)) for line in lines])

    return order


def _shape_of(line: BatchLine) -> LineShape | None:
    assert isinstance(line, PreparedLine)
    return line.prep.shape


def line_executor(hooks: LineHooks | None, client: EngineClient) -> Execute:
    """Batch lines answered by the HTTP endpoints' own code, as offline requests. A line an
    order hook prepared runs as prepared; any other is prepared now."""
    hooks = hooks or Untracked()

    async def execute(line: BatchLine) -> LineResult:
        prep = line.prep if isinstance(line, PreparedLine) else prepare_line(client, line)
        for attempt in range(MAX_LINE_ATTEMPTS):
            try:
                status, body = await answer_line(prep, client, hooks)
                return answered(line.custom_id, status, body)
            except ReplicaLost as e:
                # its replica was lost mid-line; nothing of it was written: run it again on
                # the replicas left (the request was consumed: prepare the line anew)
                if attempt + 1 == MAX_LINE_ATTEMPTS:
                    raise EngineGone(str(e)) from e
                log.warning("batch line %r runs again: %s", line.custom_id, e)
                prep = prepare_line(client, line)
            except EngineDeadError as e:
                raise EngineGone(str(e)) from e
        raise AssertionError("unreachable")

    return execute


async def answer_line(
    prep: LinePreparation, client: EngineClient, hooks: LineHooks
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, response or error body) of a prepared line, as `POST` would answer its
    body without streaming. Raises EngineDeadError when the engine is gone (there is no
    answer to record then)."""
    try:
        if prep.body is None:
            assert prep.error is not None
            raise prep.error
        if prep.body.stream:
            raise OpenAIError(400, "stream: streaming is not available in a batch", param="stream")
        hooks.unknown_fields.log(prep.body)
        if prep.error is not None:
            raise prep.error
        # the plan holds its lines until the batch ends; a line that runs lets go of its tokens
        request, prep.request = prep.request, None
        assert request is not None
        if not client.alive:
            raise EngineDeadError(client.dead_reason or "the engine core is not running")
        return 200, await answer(client, request, hooks.track)
    except OpenAIError as e:
        return e.status, e.body()
    except EngineDeadError:
        raise
    except ValueError as e:  # the engine rejected the request
        return 400, OpenAIError(400, str(e)).body()
