"""BlendServe ordering of a batch job's lines (the resource-aware, prefix-sharing order of the
BlendServe paper), and the plain depth-first order.

The pipeline for `blend`:
1. a prefix tree over the prompts (`prefix_tree.PrefixTree`, block granular);
2. output-length estimates: exact when the line forces its length (ignore_eos or min_tokens up
   to max_tokens); otherwise the mean measured length of a sample of lines, per subtree
   (falling back to the parent's, then the global mean), clipped to the line's max_tokens;
   with no sample, the line's max_tokens;
3. a compute density per line and per subtree (`CostModel`);
4. a plan tree: every node's children sorted by subtree density, compute-heavy first, with
   outlier subtrees whose shared prefix is cheap to recompute dissolved into their parent so
   their parts are placed by their own density;
5. a dual scan over the depth-first order of that tree: one scanner from the compute-heavy
   end, one from the memory-heavy end, keeping the lines in flight at the whole job's density.

Units: `compute_s` and `memory_s` are estimated device seconds on a `Hardware` (FLOP/s and
bytes/s), and rho = compute_s / memory_s is dimensionless (rho > 1: compute-bound). The plan
itself does not depend on the hardware or the model: every density carries the same factor
(2 * params / peak_flops) / (kv_bytes_per_token / bandwidth), and sorting and the mixing
ratio `(rho_root - rho_right) / (rho_left - rho_right)` are unchanged when all densities are
scaled alike. The constants matter only for reading rho as "compute-bound or not".
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from conserve.batch.prefix_tree import Node, PrefixTree
from conserve.batch.runner import WAIT, OrderHook, fcfs
from conserve.batch.validate import BatchLine

ORDERS = ("fcfs", "dfs", "blend")
DEFAULT_ORDER = "dfs"  # blend was slower than dfs in the first smoke runs: see docs/batch.md

# A subtree is dissolved into its parent when keeping its items together saves less than this
# fraction of its compute: (items - 1) x its span is what dissolving can cost at most (each
# item after the first recomputing the span), against everything the subtree computes.
SPLIT_THRESHOLD = 0.05
SAMPLE_FRACTION = 0.01
MIN_SAMPLE = 3
# Below this many lines of unknown length no sample is run: waiting for it would idle most of
# the window for the whole length of the longest sample line, for a plan over few lines.
MIN_LINES_TO_SAMPLE = 30
MIN_SUBTREE_SAMPLES = 2  # a subtree's own mean is used from this many measured lines on

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Hardware:
    """Peak matmul throughput (FLOP/s) and memory bandwidth (bytes/s) of a device."""

    peak_flops: float
    bandwidth: float


# Round figures: a 2-core AVX-512 server CPU (about 0.2 TFLOP/s in bf16 matmuls, 20 GB/s), and
# an A100 (312 TFLOP/s dense bf16, 2 TB/s). Override them with --planner-tflops/--planner-gbs.
HARDWARE = {"cpu": Hardware(2e11, 2e10), "cuda": Hardware(3.12e14, 2e12)}


def hardware_for(
    device: str, peak_flops: float | None = None, bandwidth: float | None = None
) -> Hardware:
    base = HARDWARE.get(device.split(":")[0], HARDWARE["cpu"])
    return Hardware(peak_flops or base.peak_flops, bandwidth or base.bandwidth)


@dataclass(frozen=True)
class CostModel:
    """Time estimates of one request on one model and device (BlendServe's density model):
    compute ~ 2 * params * tokens / peak_flops, memory ~ (p*d + d^2/2) * kv_bytes / bandwidth
    (the KV read by d decode steps over a context growing from p to p + d)."""

    num_params: int
    kv_bytes_per_token: int  # layers x 2 (K and V) x kv_heads x head_dim x dtype bytes
    hardware: Hardware

    @staticmethod
    def for_model(model_config, dtype: str, hardware: Hardware) -> CostModel:
        c = model_config
        kv = c.num_layers * 2 * c.num_kv_heads * c.head_dim * DTYPE_BYTES[dtype]
        return CostModel(c.num_params, kv, hardware)

    def compute_s(self, tokens: float) -> float:
        return 2.0 * self.num_params * tokens / self.hardware.peak_flops

    def memory_s(self, prompt: float, output: float) -> float:
        return (
            (prompt * output + output * output / 2)
            * self.kv_bytes_per_token
            / (self.hardware.bandwidth)
        )

    def density(self, prompt: float, output: float) -> float:
        """rho of one request computed from scratch."""
        return _ratio(self.compute_s(prompt + output), self.memory_s(prompt, output))


def _ratio(compute: float, memory: float) -> float:
    return compute / memory if memory > 0 else math.inf


class Shape(Protocol):
    """What the planner reads of a line (conserve.batch.prepare.LineShape)."""

    prompt_ids: list[int]
    max_tokens: int
    copies: int
    exact: bool


# -- output lengths ---------------------------------------------------------------------------


def estimate_outputs(
    tree: PrefixTree,
    shapes: Sequence[Shape | None],
    measured: dict[int, int],
    min_subtree_samples: int = MIN_SUBTREE_SAMPLES,
) -> list[float]:
    """Estimated output tokens per line (0 for invalid lines). A measured line is its
    measurement; an exact line its max_tokens; any other line the mean measurement of the
    deepest subtree holding it with at least `min_subtree_samples` measurements (the root
    with at least one), clipped to [1, max_tokens]; with no measurement at all, max_tokens."""
    order = list(tree.nodes())
    sums: dict[int, tuple[float, int]] = {}
    for node, _ in reversed(order):  # children before parents
        s = sum(measured[i] for i in node.lines if i in measured)
        k = sum(1 for i in node.lines if i in measured)
        for c in node.children.values():
            cs, ck = sums[id(c)]
            s, k = s + cs, k + ck
        sums[id(node)] = (s, k)
    est = [0.0] * len(shapes)
    stack: list[tuple[Node, float | None]] = [(tree.root, None)]
    while stack:
        node, inherited = stack.pop()
        s, k = sums[id(node)]
        need = 1 if node is tree.root else min_subtree_samples
        mean = s / k if k >= need else inherited
        for i in node.lines:
            est[i] = _line_estimate(shapes[i], measured.get(i), mean)
        stack.extend((c, mean) for c in node.children.values())
    return est


def _line_estimate(shape: Shape | None, measured: int | None, mean: float | None) -> float:
    if shape is None:
        return 0.0
    if measured is not None:
        return float(measured)
    if shape.exact or mean is None:
        return float(shape.max_tokens)
    return min(max(mean, 1.0), float(shape.max_tokens))


# -- the plan tree ----------------------------------------------------------------------------


@dataclass
class Group:
    """A subtree of the plan: `span` prompt tokens computed when it starts (its node's own
    tokens), then its children in order; or a single line (`line` set, no children).
    `compute` and `memory` (seconds) cover the whole subtree, each shared span counted once."""

    span: int
    line: int | None = None
    children: list[Group] = field(default_factory=list)
    compute: float = 0.0
    memory: float = 0.0

    @property
    def density(self) -> float:
        return _ratio(self.compute, self.memory)


def build_groups(
    tree: PrefixTree,
    shapes: Sequence[Shape | None],
    est: Sequence[float],
    cost: CostModel,
    skip: set[int] | frozenset[int] = frozenset(),
) -> Group:
    """The plan tree of the prefix tree, children in first-appearance order, lines in `skip`
    (and invalid ones) left out, empty subtrees dropped. A node holding a single line and no
    children becomes that line (its span moves onto the line)."""
    groups: dict[int, Group | None] = {}
    for node, _ in reversed(list(tree.nodes())):
        items: list[Group] = [
            _line_group(i, shapes[i], est[i], cost)
            for i in node.lines
            if i not in skip and shapes[i] is not None
        ]
        items += [g for c in node.children.values() if (g := groups.pop(id(c))) is not None]
        if not items:
            groups[id(node)] = None
        elif len(items) == 1 and items[0].line is not None and node is not tree.root:
            groups[id(node)] = _with_span(items[0], node.num_tokens, cost)
        else:
            groups[id(node)] = _group_of(node.num_tokens, items, cost)
    return groups[id(tree.root)] or Group(0)


def _line_group(i: int, shape: Shape, d: float, cost: CostModel) -> Group:
    """A line whose prompt is already computed (its span is added by its node)."""
    p = len(shape.prompt_ids)
    return Group(0, i, [], cost.compute_s(shape.copies * d), shape.copies * cost.memory_s(p, d))


def _with_span(g: Group, span: int, cost: CostModel) -> Group:
    g.span += span
    g.compute += cost.compute_s(span)
    return g


def _group_of(span: int, items: list[Group], cost: CostModel) -> Group:
    return Group(
        span,
        None,
        items,
        cost.compute_s(span) + sum(g.compute for g in items),
        sum(g.memory for g in items),
    )


def split_outliers(root: Group, cost: CostModel, threshold: float = SPLIT_THRESHOLD) -> int:
    """Dissolve every subtree whose shared span saves less than `threshold` of its compute into
    its parent: its items take its place, each carrying the span (pessimistic: each may have
    to recompute it). Bottom-up, so a chain of cheap subtrees lifts its items to the first
    subtree worth keeping. The root is never dissolved. Returns how many were dissolved."""
    dissolved = 0
    for g in _post_order(root):
        kept: list[Group] = []
        for c in g.children:
            if c.line is None and _cheap(c, cost, threshold):
                kept += [_with_span(x, c.span, cost) for x in c.children]
                dissolved += 1
            else:
                kept.append(c)
        if len(kept) != len(g.children):
            g.children = kept
            g.compute = cost.compute_s(g.span) + sum(x.compute for x in kept)
    return dissolved


def _cheap(g: Group, cost: CostModel, threshold: float) -> bool:
    return (len(g.children) - 1) * cost.compute_s(g.span) < threshold * g.compute


def _post_order(root: Group) -> list[Group]:
    out, stack = [], [root]
    while stack:
        g = stack.pop()
        out.append(g)
        stack.extend(g.children)
    return out[::-1]


def sort_by_density(root: Group) -> None:
    """Every group's children by subtree density, highest (compute-heavy) first; stable, so
    equal densities keep first-appearance order."""
    for g in _post_order(root):
        g.children.sort(key=lambda c: -c.density)


@dataclass(frozen=True)
class Planned:
    """A line in plan order with what it costs when run there: `compute` counts the prompt
    tokens not shared with the lines before it in depth-first order."""

    line: int
    compute: float
    memory: float

    @property
    def density(self) -> float:
        return _ratio(self.compute, self.memory)


def plan_sequence(root: Group, cost: CostModel) -> list[Planned]:
    """The lines of the plan tree depth first. Each group's span is charged to the first line
    after it starts, so the sum of `compute` equals the root's."""
    out: list[Planned] = []
    pending = 0  # span tokens entered and not yet charged to a line
    stack = [root]
    while stack:
        g = stack.pop()
        if g.line is None:
            pending += g.span
            stack.extend(reversed(g.children))
            continue
        extra = cost.compute_s(pending)
        out.append(Planned(g.line, g.compute + extra, g.memory))
        pending = 0
    return out


# -- the dual scan ----------------------------------------------------------------------------


@dataclass
class Flight:
    """Compute and memory (seconds) of the lines one scanner has in flight."""

    compute: float = 0.0
    memory: float = 0.0

    def add(self, p: Planned, sign: int = 1) -> None:
        self.compute += sign * p.compute
        self.memory += sign * p.memory

    def density(self, fallback: Planned) -> float:
        """The in-flight density, or the next line's when nothing is in flight."""
        return _ratio(self.compute, self.memory) if self.memory > 0 else fallback.density


def take_left(left: Flight, right: Flight, next_left: Planned, next_right: Planned, rho: float):
    """Whether the next line comes from the compute-heavy end. The memory (memory-time, the
    denominator of rho) in flight is split so that the mix has density `rho`:
    M_left = M * (rho - rho_right) / (rho_left - rho_right), where rho_left and rho_right
    are the densities in flight at each end. Weighting by memory-time makes the mix's density
    exactly M_left/M * rho_left + M_right/M * rho_right."""
    rho_l, rho_r = left.density(next_left), right.density(next_right)
    if rho_l <= rho_r or rho >= rho_l:
        return True  # nothing to balance: follow the sorted order
    if rho <= rho_r:
        return False
    total = left.memory + right.memory
    return left.memory <= total * (rho - rho_r) / (rho_l - rho_r)


class DualScan:
    """Emits every line of `seq` (sorted compute-heavy first) exactly once, from either end.

    With `feedback`, `finished(line)` takes a line out of flight and the split balances what
    is in flight. Without it (the default), "in flight" is everything emitted so far: the
    cumulative mix stays at the job's density, so both ends run out together. Balancing only
    what is in flight let the short compute-heavy lines (which finish in a few steps) drain
    the left end early, leaving a tail of long generations with nothing to pair with (seen on
    the bench offline job); the cumulative rule cannot drift that way."""

    def __init__(self, seq: list[Planned], feedback: bool = False) -> None:
        self.seq = seq
        self.feedback = feedback
        self.lo, self.hi = 0, len(seq) - 1
        total_c, total_m = sum(p.compute for p in seq), sum(p.memory for p in seq)
        self.rho_root = _ratio(total_c, total_m)
        self.left, self.right = Flight(), Flight()
        self.flying: dict[int, tuple[Flight, Planned]] = {}

    def next(self) -> int | None:
        if self.lo > self.hi:
            return None
        a, b = self.seq[self.lo], self.seq[self.hi]
        if take_left(self.left, self.right, a, b, self.rho_root):
            self.lo += 1
            return self._fly(self.left, a)
        self.hi -= 1
        return self._fly(self.right, b)

    def _fly(self, side: Flight, p: Planned) -> int:
        side.add(p)
        self.flying[p.line] = (side, p)
        return p.line

    def finished(self, line: int) -> None:
        item = self.flying.pop(line, None)
        if item is not None and self.feedback:
            side, p = item
            side.add(p, -1)


# -- orders as runner hooks -------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerOptions:
    block_size: int = 16
    sample_fraction: float = SAMPLE_FRACTION
    min_sample: int = MIN_SAMPLE
    min_lines_to_sample: int = MIN_LINES_TO_SAMPLE
    split_threshold: float = SPLIT_THRESHOLD
    seed: int = 0
    scan_feedback: bool = False  # DualScan: balance what is in flight, not what was emitted


def dfs_order(shapes: Sequence[Shape | None], block_size: int = 16) -> list[int]:
    """Invalid lines first (they answer at once), then the prefix tree depth first."""
    tree, valid = _tree(shapes, block_size)
    return [i for i, s in enumerate(shapes) if s is None] + [valid[j] for j in tree.dfs_lines()]


def _tree(shapes: Sequence[Shape | None], block_size: int) -> tuple[PrefixTree, list[int]]:
    """The tree over the valid lines; tree line j is line valid[j]."""
    valid = [i for i, s in enumerate(shapes) if s is not None]
    return PrefixTree.build([shapes[i].prompt_ids for i in valid], block_size), valid


class BlendOrder:
    """The `blend` order as a lazily consumed iterator for `BatchRunner`: invalid lines first,
    then a sample of the lines whose output length is unknown (they are real lines: their
    results count and they never run again), then WAIT until every sample line has a result,
    then the dual scan over the plan built with the measured lengths. `observe` learns the
    sample's lengths and takes finished lines out of the scan's flight."""

    def __init__(
        self,
        lines: list[BatchLine],
        shapes: Sequence[Shape | None],
        cost: CostModel,
        options: PlannerOptions = PlannerOptions(),
    ) -> None:
        self.lines, self.shapes, self.cost, self.options = lines, list(shapes), cost, options
        self.index = {line.custom_id: i for i, line in enumerate(lines)}
        self.tree, self.valid = _tree(self.shapes, options.block_size)
        self.tree_line = {i: j for j, i in enumerate(self.valid)}  # line -> tree line
        self.sample = self._pick_sample()
        self.head = [i for i, s in enumerate(self.shapes) if s is None] + self.sample
        self.waiting = set(self.sample)  # sample lines without a result yet
        self.measured: dict[int, int] = {}  # tree line -> output tokens
        self.scan: DualScan | None = None

    def _pick_sample(self) -> list[int]:
        unknown = [i for i in self.valid if not self.shapes[i].exact]
        if len(unknown) < self.options.min_lines_to_sample:
            return []
        o = self.options
        k = min(len(unknown), max(o.min_sample, math.ceil(o.sample_fraction * len(unknown))))
        return sorted(random.Random(o.seed).sample(unknown, k))

    def __iter__(self) -> Iterator[BatchLine | object]:
        for i in self.head:
            yield self.lines[i]
        while self.waiting:
            yield WAIT
        self.scan = DualScan(self._plan(), self.options.scan_feedback)
        while (j := self.scan.next()) is not None:
            yield self.lines[self.valid[j]]

    def _plan(self) -> list[Planned]:
        tree_shapes = [self.shapes[i] for i in self.valid]
        est = estimate_outputs(self.tree, tree_shapes, self.measured)
        sampled = {self.tree_line[i] for i in self.sample}
        root = build_groups(self.tree, tree_shapes, est, self.cost, skip=sampled)
        split_outliers(root, self.cost, self.options.split_threshold)
        sort_by_density(root)
        return plan_sequence(root, self.cost)

    def observe(self, custom_id: str, output_tokens: int | None) -> None:
        i = self.index.get(custom_id)
        if i is None or i not in self.tree_line:
            return
        if i in self.waiting:
            self.waiting.discard(i)
            if output_tokens is not None:
                self.measured[self.tree_line[i]] = output_tokens
        elif self.scan is not None:
            self.scan.finished(self.tree_line[i])


ShapeOf = Callable[[BatchLine], Shape | None]


def make_order(
    name: str,
    shape_of: ShapeOf,
    cost: CostModel,
    options: PlannerOptions = PlannerOptions(),
) -> OrderHook:
    """The runner hook for order `name` (one of ORDERS)."""
    if name == "fcfs":
        return fcfs
    if name == "dfs":

        def dfs(lines: list[BatchLine]) -> list[BatchLine]:
            return [lines[i] for i in dfs_order([shape_of(x) for x in lines], options.block_size)]

        return dfs
    if name == "blend":

        def blend(lines: list[BatchLine]) -> BlendOrder:
            return BlendOrder(lines, [shape_of(x) for x in lines], cost, options)

        return blend
    raise ValueError(f"unknown batch order {name!r}; choose from {', '.join(ORDERS)}")
