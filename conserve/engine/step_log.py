"""The step log (`--step-log`): one JSON line per step and per added request, for finding out
where the engine's time went (`conserve bench coserve` summarises it)."""

from __future__ import annotations

import json
import time
from typing import TextIO

from conserve.engine.stats import StepObserver, StepRecord


class StepLog(StepObserver):
    def __init__(self, path: str) -> None:
        self.file: TextIO = open(path, "a", buffering=1)  # noqa: SIM115 - engine-long

    def on_request_added(
        self, request_id: str, request_class: str, prompt_len: int, arrived: float
    ) -> None:
        rec = {"t": round(time.monotonic(), 6), "added": request_id, "class": request_class}
        rec |= {"prompt_len": prompt_len, "arrived": round(arrived, 6)}
        self.file.write(json.dumps(rec) + "\n")

    def on_request_received(self, request_id: str, received: float | None, sent: float) -> None:
        rec = {"t": round(time.monotonic(), 6), "api": request_id, "sent": round(sent, 6)}
        rec["received"] = None if received is None else round(received, 6)
        self.file.write(json.dumps(rec) + "\n")

    def on_step_end(self, record: StepRecord) -> None:
        batch = record.batch
        on = [c for c in batch.chunks if not c.offline]
        off = [c for c in batch.chunks if c.offline]
        predicted = batch.predicted_s
        if record.resumed_from_layer is not None:
            predicted = None  # it ran only the layers after its stop
        rec = {
            "t": round(record.started, 6),  # time.monotonic() when the step started computing
            "plan_s": round(record.plan_s, 6),
            "run_s": round(record.run_s, 6),
            "apply_s": round(record.apply_s, 6),
            "predicted_s": None if predicted is None else round(predicted, 6),
            "online_predicted_s": _round(batch.online_predicted_s),
            "online": [len(on), sum(c.num_tokens for c in on)],  # [chunks, tokens]
            "offline": [len(off), sum(c.num_tokens for c in off)],
            "online_prefill_ids": [c.request_id for c in on if c.num_tokens > 1],
            "stopped_at_layer": record.stopped_at_layer,
            # a stopped step: from the stop request to the safepoint that honoured it
            "stop_wait_s": _round(record.stop_wait_s),
            "resumed_from_layer": record.resumed_from_layer,
            "kept": record.kept,  # a stopped step to be resumed: its layers are not lost
            "online_budget": batch.online_budget,
            "prediction_scale": round(record.prediction_scale, 4),
        }
        self.file.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.file.close()


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)
