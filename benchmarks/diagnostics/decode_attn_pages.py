"""Decode attention with the K/V cache on 4 KiB and on 2 MiB pages (madvise), session 32, AMD
EPYC: behind the "2 MiB pages" line of results/decode-attn-prefetch-20261204.md. Usage:
    python decode_attn_pages.py OLD.c [NEW.c ...]   (builds as decode_attn_ab.py does)
A record of a measurement, not a maintained command."""
import ctypes, sys, time, torch
from conserve.kernels import CpuKernels, build, _SOURCES
from pathlib import Path
libc=ctypes.CDLL("libc.so.6"); libc.madvise.argtypes=[ctypes.c_void_p,ctypes.c_size_t,ctypes.c_int]
def huge_empty(shape,dtype):
    n=1
    for s in shape: n*=s
    nbytes=n*torch.finfo(dtype).bits//8
    raw=torch.empty(nbytes+(2<<20),dtype=torch.uint8)
    addr=raw.data_ptr(); al=(addr+(2<<20)-1)&~((2<<20)-1)
    r=libc.madvise(al, nbytes - (nbytes % (2<<20)) if nbytes>=(2<<20) else 0, 14)
    t=raw[al-addr:al-addr+nbytes].view(dtype).view(*shape)
    return t, raw
others=[p for p in _SOURCES if p.name!="paged_attention.c"]
libs=[]
for i,src in enumerate(sys.argv[1:]):
    out=Path(f"/tmp/decode_attn_pages_{i}.so"); build(others+[Path(src)], out); libs.append(CpuKernels(ctypes.CDLL(str(out))))
hkv,hq,d=3,9,64
for bs in (16,):
  for b,ctx in [(256,384),(256,1024)]:
    mb=-(-ctx//bs); nb=b*mb
    res=[]
    for huge in (False,True):
        if huge:
            kc,kr=huge_empty((hkv,nb,bs,d),torch.bfloat16); vc,vr=huge_empty((hkv,nb,bs,d),torch.bfloat16)
            kc.copy_(torch.randn(hkv,nb,bs,d)); vc.copy_(torch.randn(hkv,nb,bs,d))
        else:
            kc=torch.randn(hkv,nb,bs,d).to(torch.bfloat16); vc=torch.randn(hkv,nb,bs,d).to(torch.bfloat16)
        tables=torch.randperm(nb).view(b,mb).contiguous(); lens=torch.full((b,),ctx,dtype=torch.long)
        q=torch.randn(b,hq,d).to(torch.bfloat16).float()
        for lib in libs:
            out=torch.empty_like(q); best=1e9
            for r in range(30):
                t0=time.perf_counter(); lib.paged_decode_attention(out,q,kc,vc,tables,lens,0.125); best=min(best,time.perf_counter()-t0)
            res.append(f"{'huge' if huge else '4k'} {best*1e3:.2f} ms {2*hkv*b*ctx*d*2/best/1e9:.0f} GB/s")
    print(f"B={b} L={ctx}:", " | ".join(res), flush=True)
print("THP", open('/proc/meminfo').read().split('AnonHugePages:')[1].split('\n')[0])
