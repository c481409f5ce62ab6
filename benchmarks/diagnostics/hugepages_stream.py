"""The compiled linear kernel streaming one decode step's packed weights (SmolLM2-135M's shapes,
random values) from ordinary 4 KiB pages and from a copy on a madvised anonymous mapping
(transparent huge pages), alternated ten times; median pass time per row count.

    PYTHONPATH=. python benchmarks/diagnostics/hugepages_stream.py
"""

import statistics
import time

import torch

from conserve.hugepages import Arena
from conserve.kernels import cpu_kernels, pack_linear_weight

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30 + [(576, 49152)]


def main() -> None:
    kern = cpu_kernels()
    assert kern is not None, "the compiled kernels did not build"
    torch.manual_seed(0)
    small = [pack_linear_weight((torch.randn(k, n) * 0.02).bfloat16()) for k, n in SHAPES]
    arena = Arena(sum(Arena.room(tuple(p.shape), p.dtype) for p in small))
    assert arena.buf is not None, "no madvised mapping here"
    huge = [arena.take(tuple(p.shape), p.dtype).copy_(p) for p in small]
    total = sum(p.numel() * 2 for p in small)
    print(f"{total / 1e6:.0f} MB of packed weights")
    for rows in (1, 4):
        xs = {k: torch.randn(rows, k).bfloat16() for k in (576, 1536)}
        res: dict[str, list[float]] = {"4k": [], "2m": []}
        for _ in range(10):
            for name, ws in (("4k", small), ("2m", huge)):
                t0 = time.perf_counter()
                for (k, n), w in zip(SHAPES, ws, strict=True):
                    kern.linear_bf16(xs[k], w, k, n, None)
                res[name].append(time.perf_counter() - t0)
        a, b = statistics.median(res["4k"]), statistics.median(res["2m"])
        print(
            f"rows {rows}: 4k pages {a * 1e3:.2f} ms ({total / a / 1e9:.1f} GB/s)  "
            f"2M pages {b * 1e3:.2f} ms ({total / b / 1e9:.1f} GB/s)  ratio {b / a:.3f}"
        )


if __name__ == "__main__":
    main()
