"""The bf16 linear paths side by side on SmolLM2's weight shapes: the compiled kernel
(linear_bf16.c), oneDNN on its prepacked weight, and torch.mm. Random weights; each figure is
the best of three medians, the paths alternated.

    PYTHONPATH=. .venv/bin/python benchmarks/diagnostics/linear_paths.py > OUT.txt
"""

import platform
import statistics
import time
from functools import partial

import torch

from conserve.kernels import cpu_kernels
from conserve.kernels.linear import FastLinear, onednn_bf16

SHAPES = [(576, 960, "qkv"), (576, 3072, "gate_up"), (1536, 576, "down"), (576, 49152, "lm_head")]
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def best_median(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    torch.manual_seed(0)
    kern = cpu_kernels()
    assert kern is not None, "the compiled kernels did not build"
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; times in ms"
    )
    print("shape rows kernel onednn mm kernel/onednn kernel/mm")
    for k, n, name in SHAPES:
        w = (torch.randn(k, n) * 0.02).bfloat16()
        fl = FastLinear(w, None, kern, False)
        onednn = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), 16)
        for m in ROWS:
            if name == "lm_head" and m > 256:
                continue
            x = torch.randn(m, k).bfloat16()
            paths = {
                "kernel": partial(kern.linear_bf16, x, fl.packed, k, n, None),
                "onednn": partial(
                    torch.ops.mkldnn._linear_pointwise, x, onednn, None, "none", [], ""
                ),
                "mm": partial(torch.mm, x, w),
            }
            work = m * n / (576 if name == "lm_head" else 64)
            reps = min(max(int((2e4 if name == "lm_head" else 2e5) / work), 3), 200)
            res: dict[str, list[float]] = {}
            for _ in range(3):
                for p, f in paths.items():
                    res.setdefault(p, []).append(best_median(f, reps))
            r = {p: min(v) * 1e3 for p, v in res.items()}
            print(
                f"{name} {m} {r['kernel']:.3f} {r['onednn']:.3f} {r['mm']:.3f} "
                f"{r['kernel'] / r['onednn']:.2f} {r['kernel'] / r['mm']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    assert onednn_bf16(), "torch's oneDNN bf16 linear is not available here"
    main()
