"""The benchmark table behind `conserve bench <name>`, and the step observer the in-process
benchmarks read steps through."""

from __future__ import annotations

from conserve.bench.common import StepClock
from conserve.bench.registry import BENCHES
from conserve.cli import build_parser


def _bench_parsers():
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    return bench._subparsers._group_actions[0].choices


def test_every_table_row_is_a_bench_subcommand_running_its_function():
    names = [b.name for b in BENCHES]
    assert names == [
        "throughput",
        "roofline",
        "coserve",
        "dtype",
        "offline",
        "preempt",
        "pause",
        "serve",
        "soak",
    ]
    assert list(_bench_parsers()) == names
    for b in BENCHES:
        args = build_parser().parse_args(["bench", b.name])
        assert args.func is b.run


def test_in_process_benches_take_the_engine_flags_and_http_benches_their_own():
    parsers = _bench_parsers()
    for b in BENCHES:
        flags = {s for a in parsers[b.name]._actions for s in a.option_strings}
        assert ("--safepoint-every" in flags) == b.engine_args, b.name
        assert "--output" in flags and "--model" in flags
    # bench offline keeps its own default of 32 seats over the engine's 256
    assert build_parser().parse_args(["bench", "offline"]).max_num_seqs == 32


def test_step_clock_sees_step_starts_and_ends(tiny_llama_dir):
    from conserve import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), dtype="float32", max_num_batched_tokens=32)
    clock = StepClock()
    llm.engine.add_observer(clock)
    llm.generate([[300 + i for i in range(40)]], SamplingParams(temperature=0, max_tokens=3))
    # 40 prompt tokens in chunks of 32 and 8, then two decodes
    steps = [ids for _, ids in clock.steps]
    assert steps == [{"gen-0": 32}, {"gen-0": 8}, {"gen-0": 1}, {"gen-0": 1}]
    assert clock.started.is_set() and len(clock.run_times()) == 4 and not clock.stopped_layers()
    assert clock.first_start("gen-0", after=clock.steps[1][0]) == clock.steps[1][0]
    clock.reset()
    assert not clock.steps and not clock.ended and not clock.started.is_set()
