"""The decode attention kernel alone (paged_decode_attention) from several kernel builds, side
by side: B sequences of ctx tokens, SmolLM2's heads (9 query, 3 KV, head size 64), blocks of
16 tokens scattered at random. From memory (default): every call uses another of 30 layers'
caches, as a decode step does; `--in-cache`: the same layer's cache every call.

    PYTHONPATH=. python benchmarks/diagnostics/decode_attn_builds.py A.so B.so ... [--in-cache]

Each .so is a kernel library built from a variant of the sources (conserve.kernels.build).
Prints per shape each build's time per call and its K/V read rate (best of three medians).
"""

import argparse
import ctypes
import statistics
import time

import torch

from conserve.kernels import CpuKernels

HQ, HKV, D, BS = 9, 3, 64, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--in-cache", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = 1 if args.in_cache else 30
    shapes = (
        [(2, 256), (4, 256), (8, 256), (16, 256)]
        if args.in_cache
        else [(1, 256), (8, 256), (32, 256), (256, 256), (256, 384)]
    )
    libs = {p: CpuKernels(ctypes.CDLL(p)) for p in args.libs}
    for b, ctx in shapes:
        mb = (ctx + BS - 1) // BS
        nb = b * mb + 8
        k = torch.randn(layers, HKV, nb, BS, D).bfloat16()
        v = torch.randn(layers, HKV, nb, BS, D).bfloat16()
        tables = torch.randperm(nb)[: b * mb].view(b, mb).contiguous()
        lens = torch.full((b,), ctx, dtype=torch.int64)
        q = torch.randn(b, HQ, D)
        out = torch.empty(b, HQ, D)
        res: dict[str, list[float]] = {}
        for _ in range(3):
            for name, kern in libs.items():
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for layer in range(30):
                        i = layer % layers
                        kern.paged_decode_attention(out, q, k[i], v[i], tables, lens, D**-0.5)
                    ts.append((time.perf_counter() - t0) / 30)
                res.setdefault(name, []).append(statistics.median(ts))
        kv = b * HKV * ctx * D * 2 * 2
        cells = [
            f"{n.split('/')[-1]} {min(t) * 1e6:8.1f} us ({kv / min(t) / 1e9:5.1f} GB/s)"
            for n, t in res.items()
        ]
        print(f"B={b:3d} ctx={ctx}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
