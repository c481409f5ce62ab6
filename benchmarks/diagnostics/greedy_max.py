"""Greedy sampling of a 240-row step's logits (vocabulary 49152) on 2 threads: the float32 copy,
argmax, and max(dim) (which the sampler uses). A record, not a maintained command."""

import time

import torch

torch.set_num_threads(2)
x = torch.randn(240, 49152, dtype=torch.bfloat16)
xf = x.float()


def ms(f, n=20):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


print("bf16 -> float32 copy   %.1f ms" % ms(lambda: x.float()))
print("argmax, float32        %.1f ms" % ms(lambda: xf.argmax(-1)))
print("max(dim), float32      %.1f ms" % ms(lambda: xf.max(-1)))
print("max(dim), bf16         %.1f ms" % ms(lambda: x.max(-1)))
