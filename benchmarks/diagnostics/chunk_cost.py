import time, torch, sys
from conserve import LLM, SamplingParams
from conserve.engine.request import RequestClass
res = {}
llms = {c: LLM("default", dtype="bfloat16", policy="fcfs", kv_cache_gb=0.5, max_num_batched_tokens=c) for c in (2048, 1024, 512)}
for rep in range(4):
    for c, llm in llms.items():
        eng = llm.engine
        base = 100 + rep * 9000
        for i in range(8):
            eng.add_request(f"r{rep}-{c}-{i}", list(range(base + i * 1100, base + i * 1100 + 1024)), SamplingParams(max_tokens=1), RequestClass.OFFLINE)
        t0 = time.perf_counter(); n = 0
        while eng.has_unfinished():
            eng.step(); n += 1
        dt = time.perf_counter() - t0
        res.setdefault(c, []).append(dt)
        print(rep, c, n, "steps", round(dt, 3), "s", round(8 * 1024 / dt), "tok/s", flush=True)
for c, v in res.items(): print(c, "best", round(min(v), 3), "ratio to 2048", round(min(v) / min(res[2048]), 3))
