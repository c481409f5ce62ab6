"""OpenAI Files and Batch API routes (served when the server has a data directory), and the
start of the batch manager once the engine is up."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from conserve.batch.execute import batch_order, line_executor
from conserve.batch.files import FileRejected
from conserve.batch.manager import COMPLETION_WINDOW_S, BatchManager
from conserve.batch.store import FINAL, FileRow
from conserve.batch.validate import ENDPOINTS
from conserve.core.client import EngineClient
from conserve.openai.errors import OpenAIError
from conserve.server.state import ServerSettings, ServerState


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


async def start_batches(state: ServerState, client: EngineClient, settings: ServerSettings) -> None:
    """Called by the app's lifespan once the engine is up: resume unfinished batches."""
    assert state.batches is not None
    state.batches.order = batch_order(
        client, settings.batch_order, settings.planner_tflops, settings.planner_gbs
    )
    await state.batches.start(
        line_executor(state, client),
        client.model_name,
        # about max_num_seqs lines in flight per engine: the engine's own queue stays short,
        # so the batch order (not the queue) decides what the scheduler admits next
        default_window=client.config.scheduler.max_num_seqs * client.num_replicas,
        stop_if=lambda: state.draining,
    )


def batch_api_routes(state: ServerState, settings: ServerSettings) -> APIRouter:
    """The /v1/files and /v1/batches routes over a new BatchManager of the data directory."""
    assert settings.data_dir is not None
    manager = state.batches = BatchManager(Path(settings.data_dir))
    router = APIRouter(prefix="/v1")
    router.include_router(_file_routes(manager, settings))
    router.include_router(_batch_routes(manager))
    return router


def _not_found(kind: str, object_id: str) -> OpenAIError:
    return OpenAIError(404, f"no such {kind}: {object_id!r}", param="id", code="not_found")


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _file_routes(manager: BatchManager, settings: ServerSettings) -> APIRouter:
    router = APIRouter()

    @router.post("/files")
    async def upload(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict[str, Any]:
        try:
            row = await asyncio.to_thread(
                manager.files.save_upload,
                file.file,
                file.filename or "",
                purpose,
                settings.max_file_bytes,
            )
        except FileRejected as e:
            raise OpenAIError(e.status, str(e), param=e.param, code=e.code) from e
        return row.to_api()

    @router.get("/files")
    async def list_files(
        purpose: str | None = None,
        limit: int = Query(10_000, ge=1, le=10_000),
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        try:
            rows, more = manager.store.list_files(purpose, limit, after, order == "asc")
        except KeyError as e:
            raise OpenAIError(400, f"after: unknown file id {after!r}", param="after") from e
        return _page([r.to_api() for r in rows], more)

    def file_row(file_id: str) -> FileRow:
        row = manager.store.get_file(file_id)
        if row is None:
            raise _not_found("file", file_id)
        return row

    @router.get("/files/{file_id}")
    async def get_file(file_id: str) -> dict[str, Any]:
        return file_row(file_id).to_api()

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str) -> FileResponse:
        row = file_row(file_id)
        return FileResponse(
            manager.files.path(row.id), media_type="application/octet-stream", filename=row.filename
        )

    @router.delete("/files/{file_id}")
    async def delete_file(file_id: str) -> dict[str, Any]:
        if not manager.files.delete(file_id):
            raise _not_found("file", file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    return router


def check_batch_create(manager: BatchManager, body: BatchCreate) -> FileRow:
    """The input file of a valid create request, or the 400/404 error it is answered with."""
    if body.endpoint not in ENDPOINTS:
        raise OpenAIError(
            400,
            f"endpoint {body.endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}",
            param="endpoint",
            code="invalid_value",
        )
    if body.completion_window not in COMPLETION_WINDOW_S:
        raise OpenAIError(
            400,
            f"completion_window {body.completion_window!r} is not supported; use '24h'",
            param="completion_window",
            code="invalid_value",
        )
    meta = body.metadata or {}
    if len(meta) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()):
        raise OpenAIError(
            400,
            "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters",
            param="metadata",
            code="invalid_value",
        )
    row = manager.store.get_file(body.input_file_id)
    if row is None:
        raise _not_found("file", body.input_file_id)
    if row.purpose != "batch":
        raise OpenAIError(
            400,
            f"input_file_id: file {row.id!r} has purpose {row.purpose!r}, not 'batch'",
            param="input_file_id",
            code="invalid_value",
        )
    return row


def _batch_routes(manager: BatchManager) -> APIRouter:
    router = APIRouter()

    @router.post("/batches")
    async def create_batch(body: BatchCreate) -> dict[str, Any]:
        row = check_batch_create(manager, body)
        b = manager.create(row.id, body.endpoint, body.completion_window, body.metadata)
        return b.to_api()

    @router.get("/batches/{batch_id}")
    async def get_batch(batch_id: str) -> dict[str, Any]:
        b = manager.store.get_batch(batch_id)
        if b is None:
            raise _not_found("batch", batch_id)
        return b.to_api()

    @router.get("/batches")
    async def list_batches(
        after: str | None = None, limit: int = Query(20, ge=1, le=100)
    ) -> dict[str, Any]:
        try:
            rows, more = manager.store.list_batches(limit, after)
        except KeyError as e:
            raise OpenAIError(400, f"after: unknown batch id {after!r}", param="after") from e
        return _page([r.to_api() for r in rows], more)

    @router.post("/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> dict[str, Any]:
        b = manager.cancel(batch_id)
        if b is None:
            raise _not_found("batch", batch_id)
        if b.status in FINAL and b.status != "cancelled":
            raise OpenAIError(
                409,
                f"batch {batch_id!r} is {b.status} and cannot be cancelled",
                code="batch_not_cancellable",
            )
        return b.to_api()

    return router
