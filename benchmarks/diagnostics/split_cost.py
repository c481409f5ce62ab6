import time, torch
from conserve import LLM, SamplingParams
from conserve.engine.request import RequestClass
llm = LLM("default", dtype="bfloat16", policy="priority", kv_cache_gb=0.5, max_num_batched_tokens=2048)
eng = llm.engine
for i in range(2):
    eng.add_request(f"r{i}", list(range(1000 + i * 1100, 1000 + i * 1100 + 1024)), SamplingParams(max_tokens=1), RequestClass.OFFLINE)
batch = eng.scheduler.schedule()
print("tokens", sum(c.num_tokens for c in batch.chunks))
r = eng.runner
def t(rows, stop):
    r.sublayer_rows = rows
    best = []
    for _ in range(5):
        t0 = time.perf_counter(); r.forward(batch, stop); best.append(time.perf_counter() - t0)
    return sorted(best)[:3]
for k in range(2):
    print("whole", t(10**9, None))
    print("split512", t(512, lambda: False))
    print("split256", t(256, lambda: False))
# time of attention half vs feed-forward half
import types
times = {"attend": 0.0, "mlp": 0.0}
for layer in r.model.layers:
    for name in ("attend", "mlp"):
        f = getattr(layer, name)
        def w(*a, _f=f, _n=name, **k):
            t0 = time.perf_counter(); out = _f(*a, **k); times[_n] += time.perf_counter() - t0; return out
        setattr(layer, name, w)
r.sublayer_rows = 10**9
for _ in range(3):
    times = {"attend": 0.0, "mlp": 0.0}
    t0 = time.perf_counter(); r.forward(batch, None); print("total", time.perf_counter() - t0, times)
