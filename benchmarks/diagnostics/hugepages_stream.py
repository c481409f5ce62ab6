"""The compiled linear kernel streaming one decode step's packed weights (SmolLM2-135M's shapes,
random values) from ordinary 4 KiB pages and from a copy on a madvised anonymous mapping
(transparent huge pages), alternated ten times; median pass time per row count.

    PYTHONPATH=. python benchmarks/diagnostics/hugepages_stream.py
"""

import mmap, ctypes, time, statistics, torch, sys
from conserve.kernels import cpu_kernels, pack_linear_weight

kern = cpu_kernels()
torch.manual_seed(0)
shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30 + [(576, 49152)]
packed = [pack_linear_weight((torch.randn(k, n) * 0.02).bfloat16()) for k, n in shapes]
total = sum(p.numel() * 2 for p in packed)
print(f"{total / 1e6:.0f} MB of packed weights")
HUGE = 2 << 20


def huge_copy(ts):
    size = sum(-(-t.numel() * 2 // 4096) * 4096 for t in ts) + HUGE
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    off = (-buf.data_ptr()) % HUGE
    out = []
    for t in ts:
        n = t.numel() * 2
        view = buf[off : off + n].view(torch.bfloat16).view(t.shape)
        view.copy_(t)
        out.append(view)
        off += -(-n // 4096) * 4096
    return m, out


m, hp = huge_copy(packed)
print(open("/proc/meminfo").read().split("AnonHugePages:")[1].split("\n")[0])
for rows in [1, 4]:
    xs = {k: torch.randn(rows, k).bfloat16() for k in (576, 1536)}
    res = {"4k": [], "2m": []}
    for rnd in range(10):
        for name, ws in (("4k", packed), ("2m", hp)):
            t0 = time.perf_counter()
            for (k, n), w in zip(shapes, ws):
                kern.linear_bf16(xs[k], w, k, n, None)
            res[name].append(time.perf_counter() - t0)
    a, b = statistics.median(res["4k"]), statistics.median(res["2m"])
    print(
        f"rows {rows}: 4k pages {a * 1e3:.2f} ms ({total / a / 1e9:.1f} GB/s)  2M pages {b * 1e3:.2f} ms ({total / b / 1e9:.1f} GB/s)  ratio {b / a:.3f}"
    )
