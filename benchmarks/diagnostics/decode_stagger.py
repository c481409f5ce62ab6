"""Whole decode steps of 240 requests whose contexts run from 1100 tokens down to 100 in the
order they were added (a running batch is ordered by age), on the default model in bf16
(session 29). Run it on two checkouts to compare them:

    PYTHONPATH=/path/to/checkout python decode_stagger.py

A record, not a maintained command."""

import random
import statistics
import time
from dataclasses import replace

import conserve
from conserve.config import CacheConfig, EngineConfig, SchedulerConfig
from conserve.engine.engine import Engine
from conserve.engine.request import RequestClass
from conserve.sampling.params import SamplingParams

B = 240


def main() -> None:
    cfg = EngineConfig(
        dtype="bfloat16",
        scheduler=replace(SchedulerConfig(), policy="fcfs", max_num_seqs=256),
        cache=replace(CacheConfig(), host_kv_gb=0.0, enable_prefix_caching=False),
    )
    eng = Engine.from_config(cfg)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    for i in range(B):
        n = int(1100 - 1000 * i / (B - 1))
        prompt = [rng.randrange(100, 40000) for _ in range(n)]
        eng.add_request(f"o{i}", prompt, params, RequestClass.OFFLINE)
    while not (
        len(eng.scheduler.running) == B
        and all(r.num_output_tokens > 0 for r in eng.scheduler.running)
    ):
        eng.step()
    times = []
    for _ in range(12):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    print(
        f"{conserve.__file__}: decode step of {B} median {1000 * statistics.median(times):.1f} ms"
        f" ({', '.join(f'{1000 * x:.0f}' for x in times)})"
    )


if __name__ == "__main__":
    main()
