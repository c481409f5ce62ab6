"""`conserve bench dtype`: float32 against bfloat16 on this machine, in one run (the
measurement behind `--dtype auto`)."""

from __future__ import annotations

import argparse
import dataclasses
import time

from conserve.bench.common import machine_info, synthetic_requests, write_results
from conserve.bench.throughput import decode_step_ms
from conserve.engine_args import engine_config
from conserve.llm import LLM
from conserve.platform import cpu_has_native_bf16
from conserve.sampling.params import SamplingParams
from conserve.tables import md_table


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-requests", type=int, default=8, help="prompts of --prompt-len")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-batch-sizes", default="1,32")
    p.add_argument("--output", default="benchmarks/results", help="results directory")


def run_dtype(args: argparse.Namespace) -> int:
    base = engine_config(args)
    rows, data = [], {"machine": machine_info(), "native_bf16": cpu_has_native_bf16(), "runs": []}
    sizes = [int(x) for x in args.decode_batch_sizes.split(",") if x.strip()]
    for dtype in ("float32", "bfloat16"):
        llm = LLM.from_config(dataclasses.replace(base, dtype=dtype))
        reqs = synthetic_requests(
            args.prefill_requests, args.prompt_len, 1, llm.tokenizer.vocab_size, spread=0.0
        )
        prompts = [r.prompt_token_ids for r in reqs]
        params = SamplingParams(temperature=0, max_tokens=1)
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        prefill = sum(len(p) for p in prompts) / (time.perf_counter() - t0)
        decode = {b: decode_step_ms(llm, b, args.prompt_len) for b in sizes}
        data["runs"].append({"dtype": dtype, "prefill_tokens_per_s": prefill, "decode_ms": decode})
        rows.append([dtype, f"{prefill:.0f}"] + [f"{decode[b]:.1f}" for b in sizes])
        print(rows[-1])
        del llm
    m = data["machine"]
    md = "\n".join(
        [
            "# float32 against bfloat16",
            "",
            f"- date: {m['date']}; machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}",
            f"- command: `{m['command']}`",
            f"- native bf16 matmuls (AVX512-BF16 or AMX): {data['native_bf16']}",
            "",
            md_table(
                ["dtype", "prefill tokens/s"] + [f"decode ms/step, batch {b}" for b in sizes], rows
            ),
            "",
        ]
    )
    path = write_results(args.output, "dtype", md, data)
    print(md)
    print(f"written to {path}")
    return 0
