"""CPU seconds per process while 256 clients keep decode-heavy offline requests flowing,
streaming or not. Usage: cpu_share.py stream|nostream [seconds]"""
import asyncio, os, sys, time
import httpx
from conserve.bench.serve import launch_conserve, served_model, request_body, send_one, RequestRecord, PromptMaker
from conserve.bench.coserve_workloads import offline_variant
from conserve.config import auto_dtype
from conserve.model.loader import resolve_model
from conserve.model.tokenizer import Tokenizer

mode = sys.argv[1]; secs = float(sys.argv[2]) if len(sys.argv) > 2 else 40
tok = Tokenizer.load(resolve_model("default"))
reqs, _ = offline_variant("decode-heavy", 1500, PromptMaker(tok, 100), 0)

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
            except OSError: pass
    return out

srv = launch_conserve("default", auto_dtype("cpu") if False else "bfloat16", [])
try:
    srv.wait_healthy(900)
    model = served_model(srv.base_url, None)
    api = srv.proc.pid
    kids = children(api)
    print("api", api, "children", kids)
    tokens = 0
    async def client(c, it):
        global tokens
        for r in it:
            body = request_body(r, model, "completions") | {"priority": 1}
            if mode == "nostream":
                body.pop("stream_options"); body["stream"] = False
                resp = await c.post(srv.base_url + "/v1/completions", json=body)
                tokens += resp.json()["usage"]["completion_tokens"]
            else:
                rec = RequestRecord(r.index, r.prompt_len, r.output_len, 0)
                await send_one(c, srv.base_url + "/v1/completions", {}, body, rec, 0)
                tokens += rec.output_tokens
    async def main():
        lim = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=lim, timeout=3600) as c:
            it = iter(reqs)
            ts = [asyncio.create_task(client(c, it)) for _ in range(256)]
            await asyncio.sleep(20)  # warm: every client running
            pids = {"api": api, **{f"core{k}": k for k in kids}}
            b = {n: cpu(p) for n, p in pids.items()}; me = time.process_time(); t = time.monotonic()
            await asyncio.sleep(secs)
            dt = time.monotonic() - t
            for n, p in pids.items():
                print(f"{n}: {(cpu(p) - b[n]) / dt:.2f} cores")
            print(f"bench: {(time.process_time() - me) / dt:.2f} cores")
            for x in ts: x.cancel()
    asyncio.run(main())
finally:
    srv.stop()
