"""Layer-wise stop and resume with nothing else running (session 29): 240 offline decodes in
one engine in this process (default model, bf16, policy conserve with a given latency
profile); each trial times a whole decode step, then a step stopped at a random moment (a stop
request from another thread, as an online arrival makes one) and its resumed rest, with an
optional pause between them. Usage: python stop_resume_alone.py PROFILE.json [PAUSE_S].
A record, not a maintained command."""

import random
import statistics
import sys
import threading
import time
from dataclasses import replace

from conserve.config import CacheConfig, EngineConfig, SchedulerConfig
from conserve.engine.engine import Engine
from conserve.engine.request import RequestClass
from conserve.sampling.params import SamplingParams


def main(profile: str, pause: float) -> None:
    cfg = EngineConfig(
        dtype="bfloat16",
        latency_profile=profile,
        scheduler=replace(SchedulerConfig(), policy="conserve", max_num_seqs=256),
        cache=replace(CacheConfig(), host_kv_gb=0.0, enable_prefix_caching=False),
    )
    eng = Engine.from_config(cfg)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    for i in range(240):
        prompt = [rng.randrange(100, 40000) for _ in range(32)]
        eng.add_request(f"o{i}", prompt, params, RequestClass.OFFLINE)
    for _ in range(30):
        eng.step()

    def stop_after(delay: float) -> None:
        time.sleep(delay)
        eng.request_stop()  # no prompt: stop whenever the step carries offline work

    whole, chain = [], []
    for _ in range(40):
        t = time.perf_counter()
        eng.step()
        whole.append(time.perf_counter() - t)
        stopper = threading.Thread(target=stop_after, args=(rng.uniform(0, 0.9 * whole[-1]),))
        stopper.start()
        t = time.perf_counter()
        out = eng.step()
        first = time.perf_counter() - t
        stopper.join()
        if out:  # the stop came too late: the step ran to its end
            continue
        time.sleep(pause)
        t = time.perf_counter()
        eng.step()
        chain.append(first + time.perf_counter() - t)
    med = statistics.median
    print(
        f"pause {pause} s: whole step median {1000 * med(whole):.1f} ms, stopped + resumed "
        f"median {1000 * med(chain):.1f} ms ({len(chain)} stops)"
    )


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
