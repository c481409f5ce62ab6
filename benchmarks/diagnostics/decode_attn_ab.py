"""A/B of decode attention builds in one process (session 31): each source file given is built
with the other kernel sources into its own library and called in turn on the same inputs
(scattered blocks, SmolLM2 heads 3 x 9 x 64); best of 30 calls each. Usage:
    python decode_attn_ab.py OLD.c NEW.c   (e.g. OLD.c from `git show a4f5aef~1:conserve/kernels/paged_attention.c`)
Prints per shape ms, GB/s of K/V read, and the largest difference to the first build.
A record of a measurement, not a maintained command."""
import ctypes, sys, time, torch
from conserve.kernels import CpuKernels, build, _SOURCES
from pathlib import Path
srcs = sys.argv[1:]
libs=[]
others=[p for p in _SOURCES if p.name!="paged_attention.c"]
for i,src in enumerate(srcs):
    out=Path(f"/tmp/pd_ab_{i}.so"); build(others+[Path(src)], out); libs.append(CpuKernels(ctypes.CDLL(str(out))))
hkv,hq,d,bs=3,9,64,16
for b,ctx in [(1,1024),(16,512),(64,384),(128,384),(256,384),(256,1024)]:
    mb=-(-ctx//bs); nb=b*mb
    kc=torch.randn(hkv,nb,bs,d).to(torch.bfloat16); vc=torch.randn(hkv,nb,bs,d).to(torch.bfloat16)
    tables=torch.randperm(nb).view(b,mb).contiguous(); lens=torch.full((b,),ctx,dtype=torch.long)
    q=torch.randn(b,hq,d).to(torch.bfloat16).float()
    outs=[torch.empty_like(q) for _ in libs]; best=[1e9]*len(libs)
    for r in range(30):
        for i,lib in enumerate(libs):
            t0=time.perf_counter(); lib.paged_decode_attention(outs[i],q,kc,vc,tables,lens,0.125); best[i]=min(best[i],time.perf_counter()-t0)
    byt=2*hkv*b*ctx*d*2
    print(f"B={b} L={ctx}: "+"  ".join(f"{x*1e3:.3f} ms {byt/x/1e9:.0f} GB/s" for x in best), "maxdiff", [f"{(o - outs[0]).abs().max().item():.1e}" for o in outs])
