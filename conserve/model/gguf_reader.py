"""Read a GGUF file into a `ModelConfig` and float32 tensors with Hugging Face names.

Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized with the `gguf` package.
llama.cpp's converter permutes the q and k projections of Llama-architecture models into an
interleaved RoPE layout; we undo that so the weights match the rotate-half convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from conserve.model.config import ModelConfig, RopeScaling, UnsupportedModelError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def gguf_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
            continue  # large token tables; the tokenizer is built by transformers
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed
            continue
    return meta


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the gguf package raises bare ValueErrors
        raise UnsupportedModelError(f"{path} is not a readable GGUF file: {e}") from e
    meta = gguf_metadata(reader)
    cfg = _config_from_metadata(meta, reader)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                raise UnsupportedModelError(
                    "GGUF files with rope frequency factors (Llama 3.1+) are not supported yet; "
                    "use the Hugging Face folder of this model instead"
                )
            continue
        shape = [int(d) for d in reversed(t.shape)]
        fast = _FAST_DEQUANT.get(t.tensor_type.name)
        if fast is not None:
            arr = fast(np.asarray(t.data)).reshape(shape)
        else:
            try:
                arr = dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise UnsupportedModelError(
                    f"tensor {t.name} has unsupported type {t.tensor_type.name}"
                ) from e
            arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if cfg.family == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
            arr = _unpermute_rope(arr, heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return cfg, tensors


def _dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    # block of 32: f16 scale, 32 x int8
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return d * q


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # 16 bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    # block of 32: f16 scale, 16 bytes of nibbles; value = (q - 8) * d
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (_nibbles(blocks[:, 2:]) - 8.0) * d


def _dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    # block of 32: f16 scale, f16 minimum, 16 bytes of nibbles; value = q * d + m
    blocks = raw.reshape(-1, 20)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return _nibbles(blocks[:, 4:]) * d + m


def _plain(raw: np.ndarray) -> np.ndarray:
    return raw.astype(np.float32)


# Vectorised fast paths for the common types; the gguf package handles the rest (K-quants, ...).
_FAST_DEQUANT = {
    "F32": _plain,
    "F16": _plain,
    "Q8_0": _dequant_q8_0,
    "Q4_0": _dequant_q4_0,
    "Q4_1": _dequant_q4_1,
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # The converter stored rows as (head, half, pair); rotate-half wants (head, pair, half).
    half_dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, half_dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_from_metadata(meta: dict[str, Any], reader: Any) -> ModelConfig:
    arch = meta.get("general.architecture", "?")
    family = _FAMILIES.get(arch)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_FAMILIES)}"
        )

    def m(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(m("embedding_length"))
    heads = int(m("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = meta.get(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        scaling = RopeScaling(kind="linear", factor=float(m("rope.scaling.factor")))
    elif scaling_type in ("none", None):
        scaling = RopeScaling()
    else:
        raise UnsupportedModelError(f"unsupported rope scaling {scaling_type!r} in GGUF")
    return ModelConfig(
        family=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(m("feed_forward_length")),
        num_layers=int(m("block_count")),
        num_heads=heads,
        num_kv_heads=int(m("attention.head_count_kv", heads)),
        head_dim=int(m("attention.key_length", hidden // heads)),
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon")),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        max_position_embeddings=int(m("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=family == "qwen2",
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        rope_scaling=scaling,
    )
