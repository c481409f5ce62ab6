"""The BlendServe planner: prefix tree, cost model, plan tree, dual scan, orders in the runner."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve.batch.planner import (
    WAIT,
    BlendOrder,
    CostModel,
    DualScan,
    Hardware,
    Planned,
    PlannerOptions,
    build_groups,
    dfs_order,
    estimate_outputs,
    make_order,
    plan_sequence,
    sort_by_density,
    split_outliers,
)
from conserve.batch.prefix_tree import PrefixTree
from conserve.batch.results import LineResult, ResultFiles
from conserve.batch.runner import BatchRunner
from conserve.batch.validate import BatchLine
from conserve.model.config import ModelConfig

# 1e6 params at 1e12 FLOP/s, 1000 KV bytes per token at 1e9 B/s: round numbers by hand
COST = CostModel(1_000_000, 1000, Hardware(1e12, 1e9))


@dataclass(frozen=True)
class Shape:
    prompt_ids: list[int]
    max_tokens: int
    copies: int = 1
    exact: bool = True


def _lines(n: int) -> list[BatchLine]:
    return [BatchLine(i + 1, f"id{i}", "/v1/completions", {}) for i in range(n)]


def _structure(tree: PrefixTree) -> list[tuple[int, list[int], list[int]]]:
    return [(depth, node.tokens(), node.lines) for node, depth in tree.nodes()]


# -- prefix tree ------------------------------------------------------------------------------


def test_tree_shape_and_dfs_order():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 5, 6], [7], [1, 2]]
    tree = PrefixTree.build(prompts, block_size=2)
    assert _structure(tree) == [
        (0, [], []),
        (1, [1, 2], [4]),
        (2, [3, 4], []),
        (3, [5], [0]),
        (3, [5, 6], [2]),
        (2, [3, 9], [1]),
        (1, [7], [3]),
    ]
    # own lines before children, children in first-appearance order (the split kept [3, 4]
    # where [3, 4, 5] was, ahead of [3, 9])
    assert tree.dfs_lines() == [4, 0, 2, 1, 3]
    assert tree.num_tokens() == 2 + 2 + 1 + 2 + 2 + 1


def test_tree_compares_whole_blocks():
    # the prompts agree on 3 tokens; with blocks of 2 they share only the first block
    tree = PrefixTree.build([[1, 2, 3, 4], [1, 2, 3, 5]], block_size=2)
    assert _structure(tree) == [(0, [], []), (1, [1, 2], []), (2, [3, 4], [0]), (2, [3, 5], [1])]
    # a prompt that is a block-aligned prefix of another ends on the inner node
    tree = PrefixTree.build([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4], [1, 2, 3, 4]], block_size=2)
    assert _structure(tree) == [(0, [], []), (1, [1, 2, 3, 4], [1, 2]), (2, [5, 6], [0])]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), max_size=25),
    st.integers(1, 4),
)
def test_tree_paths_spell_every_prompt(prompts, block_size):
    tree = PrefixTree.build(prompts, block_size)
    paths: dict[int, list[int]] = {}
    prefix: list[list[int]] = []
    for node, depth in tree.nodes():
        del prefix[depth:]
        prefix.append(node.tokens())
        for line in node.lines:
            paths[line] = [t for span in prefix for t in span]
        assert node.start % block_size == 0
        if node.children:
            assert node.end % block_size == 0
    assert paths == dict(enumerate(prompts))
    assert sorted(tree.dfs_lines()) == list(range(len(prompts)))


# -- costs and estimates ----------------------------------------------------------------------


def test_density_by_hand():
    assert COST.compute_s(100) == pytest.approx(2e6 * 100 / 1e12)  # 2e-4 s
    assert COST.memory_s(100, 10) == pytest.approx((100 * 10 + 50) * 1000 / 1e9)  # 1.05e-3 s
    assert COST.density(100, 10) == pytest.approx(2.2e-4 / 1.05e-3)
    # long prompt, short output: compute-heavy; short prompt, long output: memory-heavy
    # (1010 / 10050) / (520 / 135000) = 26.1, whatever the hardware
    assert COST.density(1000, 10) / COST.density(20, 500) == pytest.approx(26.09, rel=1e-3)


def test_kv_bytes_from_model_config():
    cfg = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 1e4, 8192, True)
    cost = CostModel.for_model(cfg, "bfloat16", Hardware(1, 1))
    assert cost.kv_bytes_per_token == 30 * 2 * 3 * 64 * 2
    assert cost.num_params == cfg.num_params


def test_estimates_use_subtree_means_then_global_clipped():
    a, b = [1, 1, 1, 1], [2, 2, 2, 2]
    shapes = [
        Shape(a + [5], 50, exact=False),  # 0 measured 10
        Shape(a + [6], 50, exact=False),  # 1 measured 20
        Shape(a + [7], 50, exact=False),  # 2 -> subtree a's mean 15
        Shape(b + [5], 500, exact=False),  # 3 measured 100
        Shape(b + [6], 500, exact=False),  # 4 -> b has 1 sample < 2: global mean 130/3
        Shape(b + [7], 30, exact=False),  # 5 -> global mean clipped to its max_tokens
        Shape(b + [8], 7, exact=True),  # 6 -> exact: max_tokens
    ]
    tree = PrefixTree.build([s.prompt_ids for s in shapes], block_size=4)
    est = estimate_outputs(tree, shapes, {0: 10, 1: 20, 3: 100})
    assert est == pytest.approx([10, 20, 15, 100, 130 / 3, 30, 7])
    assert estimate_outputs(tree, shapes, {}) == [50, 50, 50, 500, 500, 30, 7]


# -- plan tree --------------------------------------------------------------------------------


def test_children_sorted_by_density_and_dfs_kept():
    shared = list(range(100, 132))  # two 16-token blocks
    shapes = [
        Shape([1] * 16 + [2] * 4, 400),  # 0 short prompt, long output: memory-heavy
        Shape(shared + [3] * 16, 3),  # 1 \ share a prefix, short outputs
        Shape(shared + [4] * 16, 3),  # 2 /
        Shape([5] * 900, 2),  # 3 long document: the most compute-heavy
    ]
    tree = PrefixTree.build([s.prompt_ids for s in shapes])
    root = build_groups(tree, shapes, [s.max_tokens for s in shapes], COST)
    assert [c.line for c in root.children] == [0, None, 3]  # first appearance
    sort_by_density(root)
    assert [c.line for c in root.children] == [3, None, 0]
    dens = [c.density for c in root.children]
    assert dens == sorted(dens, reverse=True)
    seq = plan_sequence(root, COST)
    assert [p.line for p in seq] == [3, 1, 2, 0]  # the shared pair stays adjacent
    # the shared span is charged once, to the first line of the pair
    assert sum(p.compute for p in seq) == pytest.approx(root.compute)
    assert seq[1].compute > seq[2].compute


def test_outlier_split_dissolves_cheap_prefixes_only():
    short = [9] * 16  # one shared block before long, different tails: cheap to recompute
    long = list(range(200, 200 + 512))  # 32 shared blocks before short tails: worth keeping
    shapes = [
        Shape(short + [1] * 800, 2),
        Shape(short + [2] * 16, 300),
        Shape(long + [3] * 16, 2),
        Shape(long + [4] * 16, 2),
    ]
    tree = PrefixTree.build([s.prompt_ids for s in shapes])
    root = build_groups(tree, shapes, [s.max_tokens for s in shapes], COST)
    before = root.compute
    assert split_outliers(root, COST, threshold=0.05) == 1
    assert [c.line for c in root.children] == [0, 1, None]  # the short prefix is gone
    assert [c.line for c in root.children[2].children] == [2, 3]
    assert root.compute == pytest.approx(before + COST.compute_s(16))  # recomputed once more
    # with no threshold nothing is dissolved
    root = build_groups(tree, shapes, [s.max_tokens for s in shapes], COST)
    assert split_outliers(root, COST, threshold=0.0) == 0


# -- dual scan --------------------------------------------------------------------------------


def _two_class_seq(n: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    heavy = [Planned(i, rng.uniform(50, 150), rng.uniform(0.5, 1.5)) for i in range(n)]
    light = [Planned(n + i, rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)) for i in range(n)]
    return sorted(heavy + light, key=lambda p: -p.density)


def _running_mix(order: list[Planned]) -> list[float]:
    c = m = 0.0
    out = []
    for p in order:
        c, m = c + p.compute, m + p.memory
        out.append(c / m)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_scan_keeps_the_cumulative_mix_at_the_root_density(seed):
    seq = _two_class_seq(200, seed)
    scan = DualScan(seq)
    by_line = {p.line: p for p in seq}
    emitted = [by_line[x] for x in iter(scan.next, None)]
    assert sorted(p.line for p in emitted) == sorted(by_line)
    mix = _running_mix(emitted)
    rho = scan.rho_root
    assert max(abs(x / rho - 1) for x in mix[20:]) < 0.15
    assert max(abs(x / rho - 1) for x in mix[100:]) < 0.05
    assert mix[-1] == pytest.approx(rho)
    # the sorted order alone is far from it: the bounds above are not vacuous
    assert max(abs(x / rho - 1) for x in _running_mix(seq)[20:]) > 0.5


def _window_run(seq: list[Planned], window: int, feedback: bool) -> list[float]:
    """A runner with `window` seats: heavy lines (density > 10) take 1 tick, light ones 10;
    each tick the finished lines leave and the seats refill. The in-flight mix's relative
    error against rho_root, per tick while both kinds are left to emit."""
    scan = DualScan(seq, feedback)
    by_line = {p.line: p for p in seq}
    heavy_left = sum(1 for p in seq if p.density > 10)
    flying: dict[int, int] = {}  # line -> tick it finishes
    errors = []
    for tick in range(10 * len(seq)):
        for line in [x for x, t in flying.items() if t <= tick]:
            del flying[line]
            if feedback:
                scan.finished(line)
        while len(flying) < window and (line := scan.next()) is not None:
            heavy = by_line[line].density > 10
            heavy_left -= heavy
            flying[line] = tick + (1 if heavy else 10)
        if not flying:
            break
        if heavy_left > window and tick > 2:
            c = sum(by_line[x].compute for x in flying)
            m = sum(by_line[x].memory for x in flying)
            errors.append(abs(c / m / scan.rho_root - 1))
    return errors


def test_dual_scan_with_feedback_balances_what_is_in_flight():
    seq = _two_class_seq(300, 3)
    with_feedback = _window_run(seq, 20, feedback=True)
    assert len(with_feedback) > 10 and max(with_feedback) < 0.35
    assert sorted(with_feedback)[len(with_feedback) // 2] < 0.2  # median
    # without it, heavy lines (which finish at once) are under-represented in the window
    assert max(_window_run(seq, 20, feedback=False)) > 0.5


# -- orders -----------------------------------------------------------------------------------


def _job(n: int, seed: int, exact: bool) -> list[Shape]:
    rng = random.Random(seed)
    shots = [[rng.randrange(1000, 9000) for _ in range(64)] for _ in range(3)]
    out = []
    for i in range(n):
        if i % 3 == 0:
            p = rng.choice(shots) + [rng.randrange(1000, 9000) for _ in range(8)]
            out.append(Shape(p, rng.randint(1, 4), exact=exact))
        elif i % 3 == 1:
            p = [rng.randrange(1000, 9000) for _ in range(rng.randint(200, 300))]
            out.append(Shape(p, rng.randint(8, 24), exact=exact))
        else:
            p = [rng.randrange(1000, 9000) for _ in range(rng.randint(10, 30))]
            out.append(Shape(p, rng.randint(128, 256), exact=exact))
    return out


def test_blend_runs_the_sample_first_and_waits_for_it():
    shapes = _job(90, 0, exact=False)
    lines = _lines(90)
    order = BlendOrder(lines, shapes, COST, PlannerOptions(sample_fraction=0.01, min_sample=3))
    it = iter(order)
    first = [next(it) for _ in range(3)]
    assert {x.custom_id for x in first} == {lines[i].custom_id for i in order.sample}
    assert next(it) is WAIT and next(it) is WAIT  # nothing else before the sample's results
    for x in first[:2]:
        order.observe(x.custom_id, 5)
    assert next(it) is WAIT
    order.observe(first[2].custom_id, None)  # a failed sample line also ends the wait
    rest = list(it)
    assert WAIT not in rest
    ids = [x.custom_id for x in first + rest]
    assert sorted(ids) == sorted(x.custom_id for x in lines)
    assert len(order.measured) == 2


def test_no_sample_when_lengths_are_exact_or_few():
    assert BlendOrder(_lines(90), _job(90, 0, exact=True), COST).sample == []
    assert BlendOrder(_lines(12), _job(12, 0, exact=False), COST).sample == []


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("name", ["fcfs", "dfs", "blend"])
def test_empty_and_one_line_batches(name, n):
    shapes = _job(n, 0, exact=True)
    lines = _lines(n)
    order = make_order(name, lambda x: shapes[int(x.custom_id[2:])], COST)(lines)
    assert [x.custom_id for x in order] == [x.custom_id for x in lines]


def test_invalid_lines_come_first():
    shapes: list = _job(6, 1, exact=True)
    shapes[4] = None
    assert dfs_order(shapes)[0] == 4
    got = list(BlendOrder(_lines(6), shapes, COST))
    assert got[0].custom_id == "id4" and len(got) == 6


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 70),
    st.integers(0, 10_000),
    st.booleans(),
    st.sampled_from(["fcfs", "dfs", "blend"]),
)
def test_every_line_exactly_once(n, seed, exact, name):
    shapes: list = _job(n, seed, exact)
    rng = random.Random(seed)
    for i in rng.sample(range(n), n // 10):
        shapes[i] = None
    lines = _lines(n)
    plan = make_order(name, lambda x: shapes[int(x.custom_id[2:])], COST)(lines)
    observe = getattr(plan, "observe", None)
    it, out, flying = iter(plan), [], []
    while True:
        x = next(it, None)
        if x is WAIT:  # finish something at random, as the runner would
            assert flying
            done = flying.pop(rng.randrange(len(flying)))
            observe(done.custom_id, rng.randint(1, 50))
            continue
        if x is None:
            break
        out.append(x.custom_id)
        flying.append(x)
        if observe and rng.random() < 0.5:
            done = flying.pop(rng.randrange(len(flying)))
            observe(done.custom_id, rng.randint(1, 50))
    assert sorted(out) == sorted(x.custom_id for x in lines)


# -- in the runner ----------------------------------------------------------------------------


def _ok(cid: str, tokens: int) -> LineResult:
    body = {"usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": 1}}
    return LineResult(cid, 200, body)


def test_runner_feeds_results_to_the_order(tmp_path):
    shapes = _job(60, 2, exact=False)
    lines = _lines(60)
    options = PlannerOptions(min_sample=4)
    plans: list[BlendOrder] = []

    def order(pending):
        plans.append(BlendOrder(pending, shapes, COST, options))
        return plans[0]

    started: list[str] = []
    finished: set[str] = set()

    async def execute(line: BatchLine) -> LineResult:
        started.append(line.custom_id)
        await asyncio.sleep(0.001 * (int(line.custom_id[2:]) % 3))
        finished.add(line.custom_id)
        return _ok(line.custom_id, 7)

    rf = ResultFiles(tmp_path / "out.jsonl", tmp_path / "out.jsonl")
    runner = BatchRunner(lines, rf, execute, order=order, window=8, poll_s=0.01)
    assert asyncio.run(runner.run()) == "completed"
    rf.close()
    sample = {lines[i].custom_id for i in plans[0].sample}
    assert len(sample) == 4 and set(started[:4]) == sample
    assert plans[0].measured and set(plans[0].measured.values()) == {7}
    assert sorted(started) == sorted(x.custom_id for x in lines)
    assert not plans[0].scan.flying  # every finished line left the scan's flight


def test_runner_rejects_an_order_that_waits_on_nothing(tmp_path):
    async def execute(line: BatchLine) -> LineResult:
        return _ok(line.custom_id, 1)

    rf = ResultFiles(tmp_path / "o.jsonl", tmp_path / "o.jsonl")
    runner = BatchRunner(_lines(2), rf, execute, order=lambda ls: [WAIT])
    with pytest.raises(RuntimeError, match="waits"):
        asyncio.run(runner.run())
    rf.close()
