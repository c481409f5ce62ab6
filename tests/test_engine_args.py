"""`EngineArgs`: the command line's engine flags and `LLM(**kwargs)` give the same configs as
before they shared one definition (the expected configs below are what the earlier code built
from the same arguments), and mistakes are named."""

from __future__ import annotations

import argparse

import pytest

from conserve.cli import build_parser
from conserve.config import CacheConfig, EngineConfig, SchedulerConfig
from conserve.engine_args import EngineArgs, engine_config


def _config(argv: list[str]) -> EngineConfig:
    return engine_config(build_parser().parse_args(argv))


CLI_CASES = [
    (
        ["generate"],
        EngineConfig(model="default"),
    ),
    (
        ["serve"],
        EngineConfig(model="default", scheduler=SchedulerConfig(policy="conserve")),
    ),
    (
        ["serve", "--policy", "fcfs", "--kv-cache-gb", "1.5", "--no-prefix-caching"]
        + ["--threads", "2"],
        EngineConfig(
            model="default",
            num_threads=2,
            cache=CacheConfig(kv_cache_gb=1.5, enable_prefix_caching=False),
        ),
    ),
    (
        ["profile", "--dtype", "float32", "--max-model-len", "4096", "--block-size", "32"]
        + ["--seed", "7"],
        EngineConfig(
            model="default",
            dtype="float32",
            max_model_len=4096,
            seed=7,
            cache=CacheConfig(block_size=32),
        ),
    ),
    (
        ["batch", "run", "in.jsonl", "-o", "out.jsonl", "--max-num-seqs", "8"]
        + ["--max-num-batched-tokens", "512", "--max-prefill-chunk", "128"],
        EngineConfig(
            model="default",
            scheduler=SchedulerConfig(
                max_num_seqs=8, max_num_batched_tokens=512, max_prefill_chunk=128
            ),
        ),
    ),
    (
        ["bench", "offline"],  # the bench's own default: 32 seats
        EngineConfig(model="default", scheduler=SchedulerConfig(max_num_seqs=32)),
    ),
    (
        ["bench", "preempt", "--tpot-slo", "0.05", "--ttft-slo", "1.5", "--slo-margin", "0.2"]
        + ["--offline-step-s", "0.3", "--safepoint-every", "2", "--policy", "priority"],
        EngineConfig(
            model="default",
            safepoint_every=2,
            scheduler=SchedulerConfig(
                policy="priority",
                tpot_slo=0.05,
                ttft_slo=1.5,
                slo_margin=0.2,
                offline_step_s=0.3,
            ),
        ),
    ),
    (
        ["bench", "pause", "--host-kv-gb", "0", "--latency-profile", "p.json", "--step-log"]
        + ["s.jsonl", "--attention", "torch", "--device", "cpu", "--model", "m.gguf"],
        EngineConfig(
            model="m.gguf",
            device="cpu",
            attention="torch",
            latency_profile="p.json",
            step_log="s.jsonl",
            cache=CacheConfig(host_kv_gb=0.0),
        ),
    ),
]


@pytest.mark.parametrize(
    ("argv", "expected"), CLI_CASES, ids=[" ".join(a[:2]) for a, _ in CLI_CASES]
)
def test_flags_give_the_same_config_as_before(argv, expected):
    assert _config(argv) == expected


def test_every_field_but_the_pool_size_has_a_flag_in_its_group():
    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p)
    groups = {g.title: [a.option_strings[0] for a in g._group_actions] for g in p._action_groups}
    assert groups["engine"][:3] == ["--model", "--dtype", "--device"]
    assert groups["engine"][-3:] == ["--step-log", "--attention", "--layers"]
    assert groups["co-serving"][0] == "--policy"
    assert len(groups["engine"]) + len(groups["co-serving"]) == 26
    args = EngineArgs.from_cli_args(p.parse_args([]))
    assert args == EngineArgs()  # argparse defaults are the fields' defaults


def test_a_parser_default_can_be_changed_and_a_flag_still_wins():
    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p, policy="conserve", max_num_seqs=4)
    assert engine_config(p.parse_args([])).scheduler == SchedulerConfig(
        policy="conserve", max_num_seqs=4
    )
    assert engine_config(p.parse_args(["--policy", "fcfs"])).scheduler.policy == "fcfs"
    with pytest.raises(ValueError, match="polcy"):
        EngineArgs.add_cli_args(argparse.ArgumentParser(), polcy="conserve")
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineArgs.add_cli_args(argparse.ArgumentParser(), enable_prefix_caching=False)


def test_an_unknown_policy_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--policy", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


LLM_KWARGS = {
    "dtype": "float32",
    "num_threads": 1,
    "seed": 3,
    "attention": "torch",
    "safepoint_every": 2,
    "step_log": "log.jsonl",
    "block_size": 32,
    "num_blocks": 64,
    "kv_cache_gb": 0.5,
    "enable_prefix_caching": False,
    "host_kv_gb": 0.0,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 128,
    "max_prefill_chunk": 64,
    "policy": "priority",
    "tpot_slo": 0.1,
    "ttft_slo": 2.0,
    "slo_margin": 0.05,
    "offline_step_s": 0.5,
}
# what LLM("m", **LLM_KWARGS) built when it sorted its keyword arguments by hand
LLM_EXPECTED = EngineConfig(
    model="m",
    dtype="float32",
    num_threads=1,
    seed=3,
    attention="torch",
    safepoint_every=2,
    step_log="log.jsonl",
    scheduler=SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=128,
        max_prefill_chunk=64,
        policy="priority",
        tpot_slo=0.1,
        ttft_slo=2.0,
        slo_margin=0.05,
        offline_step_s=0.5,
    ),
    cache=CacheConfig(
        block_size=32,
        num_blocks=64,
        kv_cache_gb=0.5,
        enable_prefix_caching=False,
        host_kv_gb=0.0,
    ),
)


class _Built(Exception):
    """Raised by the stand-in engine factory instead of loading a model."""


@pytest.fixture
def built_configs(monkeypatch):
    seen: list[EngineConfig] = []

    def fake_from_config(config):
        seen.append(config)
        raise _Built

    monkeypatch.setattr("conserve.llm.Engine.from_config", fake_from_config)
    return seen


def test_llm_keyword_arguments_give_the_same_config_as_before(built_configs):
    from conserve.llm import LLM

    with pytest.raises(_Built):
        LLM("m", **LLM_KWARGS)
    with pytest.raises(_Built):
        LLM()
    assert built_configs == [LLM_EXPECTED, EngineConfig(model="default")]


def test_llm_names_an_unknown_keyword_argument(built_configs):
    from conserve.llm import LLM

    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM("m", max_num_sequences=4)
    assert built_configs == []  # refused before any engine is built


def test_invalid_values_are_refused_by_the_config_classes():
    with pytest.raises(ValueError, match="policy must be one of"):
        EngineArgs(policy="fastest").to_config()
    with pytest.raises(ValueError, match="block_size"):
        EngineArgs(block_size=12).to_config()


def test_options_that_cannot_run_together_are_a_command_line_error(capsys, tmp_path):
    from conserve.cli import main

    host = str(tmp_path / "host-kv")
    assert main(["serve", "--policy", "fcfs", "--host-kv-path", host]) == 2
    assert "--host-kv-path backs the host tier" in capsys.readouterr().err
    assert main(["serve", "--host-kv-gb", "0", "--host-kv-path", host]) == 2
    assert main(["serve", "--block-size", "3"]) == 2
    assert "block_size must be a power of two" in capsys.readouterr().err
    assert not (tmp_path / "host-kv").exists()  # refused before anything was made
