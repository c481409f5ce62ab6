"""PNG plots of `conserve bench coserve`: per online mode, the CDFs of online TTFT and TPOT in
each run (a row per offline variant), and offline tokens/s over time (a panel per variant)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conserve.bench.coserve_drive import RunResult, token_times
from conserve.bench.coserve_plan import MIXED, OFFLINE_ALONE, ONLINE_ALONE

BIN_S = 10.0  # offline throughput bins


def make_plots(
    runs: list[tuple[dict[str, Any], RunResult]], out_dir: Path, stamp: str
) -> list[str]:
    """Write the plots under `out_dir`; returns their file names. `runs` pairs each run's
    summary (run_summary) with what it measured."""
    import matplotlib  # the bench extra; run_coserve checked it is installed

    matplotlib.use("Agg")
    summaries = [s for s, _ in runs]
    modes = list(dict.fromkeys(s["mode"] for s in summaries if s["kind"] == MIXED))
    variants = list(dict.fromkeys(s["variant"] for s in summaries if s["kind"] == MIXED))
    names = [_latency_cdfs(summaries, mode, variants, out_dir, stamp) for mode in modes]
    names.append(_offline_over_time(runs, variants, out_dir, stamp))
    return names


def _latency_cdfs(
    summaries: list[dict], mode: str, variants: list[str], out_dir: Path, stamp: str
) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(variants), 2, figsize=(11, 3.6 * len(variants)), squeeze=False)
    alone = [s for s in summaries if s["kind"] == ONLINE_ALONE and s["mode"] == mode]
    for row, variant in zip(axes, variants, strict=True):
        mine = [
            s
            for s in summaries
            if s["kind"] == MIXED and (s["mode"], s["variant"]) == (mode, variant)
        ]
        for s in alone + mine:
            for ax, key in zip(row, ("ttft_ms", "tpot_ms"), strict=True):
                v = np.sort([x[key] for x in s["online_requests"] if x[key] is not None])
                if len(v):
                    ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=s["label"])
        for ax, name in zip(row, ("TTFT (ms)", "TPOT (ms)"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel(f"online {name}, offline {variant}")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=8)
    fig.suptitle(f"online {mode}")
    fig.tight_layout()
    name = f"coserve-{stamp}-{mode}-latency-cdf.png"
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return name


def _offline_over_time(
    runs: list[tuple[dict, RunResult]], variants: list[str], out_dir: Path, stamp: str
) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(variants), 1, figsize=(9, 3.4 * len(variants)), squeeze=False)
    for ax, variant in zip(axes[:, 0], variants, strict=True):
        for s, r in runs:
            if s["variant"] != variant or s["kind"] not in (MIXED, OFFLINE_ALONE) or not r.offline:
                continue
            counts = _offline_bins(r)
            label = s["label"] if s["kind"] == OFFLINE_ALONE else f"{s['mode']} / {s['label']}"
            x = np.arange(len(counts)) * BIN_S + BIN_S / 2
            ax.plot(x, counts / BIN_S, label=label, marker="o" if len(counts) < 3 else None)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(f"offline {variant} tok/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"coserve-{stamp}-offline-throughput.png"
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return name


def _offline_bins(r: RunResult) -> np.ndarray:
    """Offline tokens per BIN_S bin of the window: a prompt counts at its first token."""
    counts = np.zeros(max(1, int(np.ceil(r.window_s / BIN_S))))
    last = len(counts) - 1
    for x in r.offline:
        tt = [t for t in token_times(x) if t <= r.window_s]
        if tt:
            counts[min(int(tt[0] // BIN_S), last)] += x.prompt_len
        for t in tt:
            counts[min(int(t // BIN_S), last)] += 1
    return counts
