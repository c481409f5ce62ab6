"""A/B of prefill attention builds in one process (session 31): each source file given is built
with the other kernel sources into its own library and called in turn on the same inputs
(SmolLM2 heads 3 x 9 x 64, chunks with and without cached context); best of repeated calls.
Usage: python prefill_attn_ab.py A.c B.c ...  Prints ms and GFLOP/s of causal attention
(4 x heads x 64 x T x (L - T/2) FLOPs) per build, and whether the outputs are identical.
The first version of the kernel measured with it is not kept. A record, not a maintained command."""
import ctypes, subprocess, sys, time, torch
from conserve.kernels import CpuKernels, build, _SOURCES
from pathlib import Path
srcs = sys.argv[1:]
libs=[]
others=[p for p in _SOURCES if p.name!="prefill_attention.c"]
for i,src in enumerate(srcs):
    out=Path(f"/tmp/pa_ab_{i}.so"); build(others+[Path(src)], out); libs.append(CpuKernels(ctypes.CDLL(str(out))))
hkv,hq,d,bs=3,9,64,16
for t,ctx in [(256,256),(512,512),(2048,2048),(64,1088),(512,1536)]:
    nb=-(-ctx//bs)
    kc=torch.randn(hkv,nb,bs,d).to(torch.bfloat16); vc=torch.randn(hkv,nb,bs,d).to(torch.bfloat16)
    q=torch.randn(t,hq,d).to(torch.bfloat16); ids=torch.arange(nb)
    scratch=torch.empty(libs[0].prefill_attention_scratch(hkv,ctx,d),dtype=torch.uint8)
    outs=[torch.empty_like(q) for _ in libs]; best=[1e9]*len(libs)
    reps = max(3, int(2000/ (t*ctx/4096)))
    for r in range(min(reps,200)):
        for i,lib in enumerate(libs):
            t0=time.perf_counter(); lib.paged_prefill_attention_bf16(outs[i],q,kc,vc,ids,ctx,0.125,scratch); best[i]=min(best[i],time.perf_counter()-t0)
    fl=4*hq*d*t*(ctx-t/2)
    print(f"T={t} L={ctx}: "+"  ".join(f"{b*1e3:.2f} ms {fl/b/1e9:.0f} GF/s" for b in best), "same" if all(torch.equal(outs[0],o) for o in outs) else "differ")
