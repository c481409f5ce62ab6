"""LM head + greedy sampling of an offline decode step, in one piece and in row slices
(session 27; a record, not a maintained command). The runner computes a stoppable offline
step's LM head in slices of LOGITS_SLICE_ROWS rows with a safepoint before each; this shows
what the slices cost against one piece and how long an arrival may wait for one slice.

Usage: python lm_head_slices.py [ROWS]   (default 240, the offline decodes of `bench coserve`)
SmolLM2-135M's LM head shape (576 x 49152), bf16, prepacked as the engine packs it
(kernels/linear.py), random weights; the median of 20 timed runs after 3 warm-ups, each way
in turn, twice."""

import platform
import statistics
import sys
import time

import torch

from conserve.kernels.linear import FastLinear, onednn_bf16

HIDDEN, VOCAB = 576, 49152


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 240
    torch.manual_seed(0)
    lm_head = FastLinear(
        torch.randn(HIDDEN, VOCAB, dtype=torch.bfloat16) * 0.05, None, None, onednn_bf16()
    )
    h = torch.randn(rows, HIDDEN, dtype=torch.bfloat16)

    def run(size: int) -> list[int]:
        out: list[int] = []
        for lo in range(0, rows, size):
            out += lm_head(h[lo : lo + size]).max(dim=-1).indices.tolist()
        return out

    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if "model name" in line]
    cpu = names[0] if names else platform.processor()
    print(f"cpu: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; rows {rows}")
    assert run(rows) == run(64) == run(32)  # same tokens whichever way
    for _ in range(2):
        for size in (rows, 120, 64, 32):
            for _ in range(3):
                run(size)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                run(size)
                times.append(time.perf_counter() - t)
            n = -(-rows // size)
            med = statistics.median(times) * 1e3
            print(
                f"slices of {size:3d} rows ({n} slices): {med:6.2f} ms, {med / n:5.2f} ms a slice"
            )


if __name__ == "__main__":
    main()
