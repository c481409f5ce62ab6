"""The paged decode attention kernel on one layer of a 240-decode step whose contexts run from
1200 tokens down to 100 (a running batch in age order), shuffled, and all equal (session 29).
Usage: python attn_balance.py KERNEL_SOURCE_DIR [...] (a copy of conserve/kernels, e.g. one
with another OpenMP schedule). A record, not a maintained command."""

import ctypes
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from conserve.kernels import _SOURCES, CpuKernels, build

B, HQ, HKV, D, BS, NB = 240, 9, 3, 64, 16, 20000  # the default model's heads


def run(kernels: CpuKernels, lens: list[int], kc, vc, q, out) -> float:
    mb = max((n + BS - 1) // BS for n in lens)
    perm = list(range(NB))
    random.Random(1).shuffle(perm)
    tables = torch.tensor([[perm[(i * 80 + j) % NB] for j in range(mb)] for i in range(B)])
    ctx = torch.tensor(lens, dtype=torch.int64)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        kernels.paged_decode_attention(out, q, kc, vc, tables, ctx, 0.125)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(dirs: list[str]) -> None:
    torch.manual_seed(0)
    kc = torch.randn(HKV, NB, BS, D).to(torch.bfloat16)
    vc = torch.randn(HKV, NB, BS, D).to(torch.bfloat16)
    q, out = torch.randn(B, HQ, D), torch.empty(B, HQ, D)
    aged = [int(1200 - 1100 * i / (B - 1)) for i in range(B)]
    shuffled = aged[:]
    random.Random(2).shuffle(shuffled)
    with tempfile.TemporaryDirectory() as tmp:
        for d in dirs:
            lib = Path(tmp) / f"k{len(list(Path(tmp).iterdir()))}.so"
            build([Path(d) / s.name for s in _SOURCES], lib)
            k = CpuKernels(ctypes.CDLL(str(lib)))
            ms = [run(k, lens, kc, vc, q, out) for lens in (aged, shuffled, [650] * B)]
            print(f"{d}: age order {ms[0]:.2f} ms, shuffled {ms[1]:.2f} ms, equal {ms[2]:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
