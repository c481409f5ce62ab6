import time, torch
from conserve import LLM, SamplingParams
from conserve.engine.request import RequestClass
from torch.profiler import profile, ProfilerActivity
out = {}
for c in (2048, 1024):
    llm = LLM("default", dtype="bfloat16", policy="fcfs", kv_cache_gb=0.5, max_num_batched_tokens=c)
    eng = llm.engine
    for i in range(2):
        eng.add_request(f"r{i}", list(range(100 + i * 1100, 100 + i * 1100 + 1024)), SamplingParams(max_tokens=1), RequestClass.OFFLINE)
    batch = eng.scheduler.schedule()
    r = eng.runner
    for _ in range(2): r.forward(batch, None)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); r.forward(batch, None); ts.append(time.perf_counter() - t0)
    print(c, "rows", sum(ch.num_tokens for ch in batch.chunks), "step", [round(x*1e3) for x in ts])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r.forward(batch, None)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
