"""The bf16 feed-forward half of one decoder layer (the default model, the engine's fast
layers), run whole and in row slices, fastest of 3 in each of 4 alternated rounds; and whether
the slices give the whole's result bit for bit. Usage: python feed_forward_slices.py
A record of a measurement (session 34), not a maintained command."""
import time

import torch

from conserve.kernels import cpu_kernels
from conserve.model.loader import build_model, read_weights, resolve_model

torch.set_num_threads(2)
cfg, w = read_weights(resolve_model("default"))
model = build_model(cfg, w, torch.bfloat16, torch.device("cpu"))
print("layers:", model.use_fast_layers(cpu_kernels()))
print("cpu:", open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" \t:"))
layer = model.layers[3]


def run(h, rows_per_slice):
    if rows_per_slice is None:
        return h + layer.mlp(h)
    for lo in range(0, h.shape[0], rows_per_slice):
        part = h[lo : lo + rows_per_slice]
        h[lo : lo + rows_per_slice] = part + layer.mlp(part)
    return h


with torch.inference_mode():
    for rows in (512, 1024, 1536, 2048):
        x = torch.randn(rows, cfg.hidden_size).bfloat16()
        best: dict = {}
        for _ in range(4):
            for s in (None, 512, 256, 128):
                ts = []
                for _ in range(3):
                    h = x.clone()
                    t = time.perf_counter()
                    run(h, s)
                    ts.append(time.perf_counter() - t)
                best[s] = min(best.get(s, 1e9), min(ts))
        whole = best[None]
        cells = ", ".join(f"{s or 'whole'}: {v * 1e3:.2f} ms ({v / whole:.3f}x)" for s, v in best.items())
        same = torch.equal(run(x.clone(), None), run(x.clone(), 256))
        print(f"{rows} rows: {cells}; 256-row slices bit-identical: {same}")
