"""A/B of linear_bf16.c builds over one decode step's weights (SmolLM2-135M: 30 layers of
qkv 576x960, o 576x576, gate-up 576x3072, down 1536x576, then the 576x49152 LM head; 269 MB
of bf16, each weight its own buffer so that every call streams from memory as in a step).
Builds alternate, best of REPS whole passes each. Also a pure-read kernel's bandwidth.
Usage (simd.h copied next to the sources):
    python ab.py base=OLD.c nopf=linear_bf16_variants.c:-DPF_HINT=-1 t1_4k=linear_bf16_variants.c:-DPF_LINES=2,-DPF_HINT=1,-DPF_DIST=4096
OLD.c: `git show 242d520:conserve/kernels/linear_bf16.c` (before the change).
A record of a measurement (session 33), not a maintained command."""
import ctypes, sys, time, torch
from pathlib import Path
from conserve.kernels import CpuKernels, build, _SOURCES, pack_linear_weight
REPS = 15
here = Path(__file__).parent
others = [p for p in _SOURCES if p.name != "linear_bf16.c"]
libs = []
for i, spec in enumerate(sys.argv[1:]):
    name, rest = spec.split("=", 1)
    src, _, flags = rest.partition(":")
    out = Path(f"/tmp/lin_ab_{i}.so")
    build(others + [Path(src)], out, tuple(f for f in flags.split(",") if f))
    libs.append((name, ctypes.CDLL(str(out))))
rb = []
for d in (0, 2048, 8192):
    out = Path(f"/tmp/readbw_{d}.so")
    build([here / "readbw.c"], out, (f"-DPF_DIST={d}",))
    lib = ctypes.CDLL(str(out)); lib.read_all.restype = ctypes.c_uint64
    lib.read_all.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    rb.append((d, lib))
nt = torch.get_num_threads()
buf = torch.ones(1 << 30, dtype=torch.uint8)
for d, lib in rb:
    best = 9
    for _ in range(5):
        t0 = time.perf_counter(); lib.read_all(buf.data_ptr(), buf.numel(), nt); best = min(best, time.perf_counter() - t0)
    print(f"pure read (prefetch T1 +{d} B): {buf.numel() / best / 1e9:.1f} GB/s")
del buf
shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30 + [(576, 49152)]
gen = torch.Generator().manual_seed(0)
ws = [pack_linear_weight((torch.randn(k, n, generator=gen) * 0.05).to(torch.bfloat16)) for k, n in shapes]
total_bytes = sum(k * n * 2 for k, n in shapes)
print(f"weights {total_bytes / 1e6:.0f} MB, threads {nt}")
for m in (1, 2, 4, 8, 16):
    xs = {k: (torch.randn(m, k, generator=gen)).to(torch.bfloat16) for k in (576, 1536)}
    ys = [torch.empty(m, n, dtype=torch.bfloat16) for k, n in shapes]
    calls = [(ys[i].data_ptr(), xs[k].data_ptr(), ws[i].data_ptr(), None, m, k, n, k, nt) for i, (k, n) in enumerate(shapes)]
    best = [9.0] * len(libs); outs = []
    for rep in range(REPS):
        for j, (name, lib) in enumerate(libs):
            f = lib.linear_bf16
            f.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
            t0 = time.perf_counter()
            for c in calls:
                f(*c)
            best[j] = min(best[j], time.perf_counter() - t0)
            if rep == 0:
                outs.append(torch.cat([y.float().flatten() for y in ys[-5:]]))
    diffs = [f"{(o - outs[0]).abs().max().item():.1e}" for o in outs]
    print(f"M={m}: " + "  ".join(f"{name} {b * 1e3:.2f} ms {total_bytes / b / 1e9:.1f} GB/s" for (name, _), b in zip(libs, best)), "maxdiff", diffs)
