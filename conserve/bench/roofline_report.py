"""The report of `conserve bench roofline`: a markdown table and a PNG (the roofline, and each
step's time split into parts, in multiples of its floor)."""

from __future__ import annotations

from pathlib import Path

from conserve.tables import md_table

PART_NAMES = {
    "linear": "linear layers",
    "attention": "attention (K/V write + read)",
    "other": "other per-layer ops",
    "head_sampling": "LM head + sampling",
    "host": "host (plan, tensors, apply)",
}


def _floor(r: dict) -> float:
    return max(r["bytes_floor_s"], r["flops_floor_s"])


def markdown(results: dict) -> str:
    m, f = results["machine"], results["floors"]
    gemms = ", ".join(
        f"{k.split()[1]}: {v / 1e12:.2f}" for k, v in f.items() if k.startswith("gemm")
    )
    lines = [
        "# Roofline: model steps against this machine's floors",
        "",
        f"- date: {m['date']}; machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads)",
        f"- command: `{m['command']}`",
        f"- model: {m['model']}, dtype {m['dtype']}; compiled CPU kernels: "
        f"{'yes' if m['kernels'] else 'no'}",
        f"- memory bandwidth: read (torch sum) {f['read'] / 1e9:.1f} GB/s, "
        + (f"read (compiled loads) {f['read_loads'] / 1e9:.1f} GB/s, " if "read_loads" in f else "")
        + f"copy (read + write) {f['copy'] / 1e9:.1f} GB/s; floors use "
        f"{f['bandwidth'] / 1e9:.1f} GB/s (each rate the best of {f.get('measurements', 1)} "
        "measurements: before, between and after the steps)",
        f"- peak GEMM ({m['dtype']}, torch.mm, square n, TFLOP/s): {gemms}; floors use "
        f"{f['peak'] / 1e12:.2f}",
        "",
        "Each row is the median of the timed steps of that shape, run by the engine (`step()`:"
        " plan, run, apply). Floors: bytes that must move (weights, K/V read and written) over"
        " the bandwidth, FLOPs over the peak; a part's floor is the larger of its two, the "
        "step's the larger of the step's totals. Times in ms; in brackets, the part's floor.",
        "",
    ]
    header = ["step", "step ms", "floor ms (bytes / FLOPs)", "step / floor"] + [
        PART_NAMES[p] for p in PART_NAMES
    ]
    rows = []
    for r in results["steps"]:
        fl = r["floors_s"]
        cells = []
        for p in PART_NAMES:
            ms = r["parts_s"][p] * 1e3
            key = {"linear": "linear", "attention": "attention", "head_sampling": "lm_head"}
            cells.append(f"{ms:.2f} ({fl[key[p]] * 1e3:.2f})" if p in key else f"{ms:.2f}")
        rows.append(
            [
                r["label"],
                f"{r['step_s'] * 1e3:.2f}",
                f"{_floor(r) * 1e3:.2f} ({r['bytes_floor_s'] * 1e3:.2f} / "
                f"{r['flops_floor_s'] * 1e3:.2f})",
                f"{r['step_s'] / _floor(r):.2f}",
                *cells,
            ]
        )
    lines.append(md_table(header, rows))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path | None:
    """The PNG, or None when matplotlib (the `bench` extra) is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, f = results["steps"], results["floors"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    ai = [r["flops"] / r["bytes"] for r in steps]
    lo, hi = min(ai) / 2, max(ai) * 2
    xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    ax1.plot(xs, [min(f["peak"], f["bandwidth"] * x) / 1e9 for x in xs], "k-", label="roof")
    for r, x in zip(steps, ai, strict=True):
        kind = r["shape"]["kind"]
        marker = "o" if kind == "decode" else ("s" if not r["shape"]["cached"] else "^")
        ax1.loglog(
            x, r["flops"] / r["step_s"] / 1e9, marker, color="C0" if kind == "decode" else "C1"
        )
        ax1.annotate(r["label"], (x, r["flops"] / r["step_s"] / 1e9), fontsize=6)
    ax1.set_xlabel("FLOPs per byte that must move")
    ax1.set_ylabel("GFLOP/s achieved (step)")
    ax1.set_title("Roofline (o decode, s prefill, ^ prefill after cached context)")
    labels = [r["label"] for r in steps]
    left = [0.0] * len(steps)
    for i, p in enumerate(PART_NAMES):
        widths = [r["parts_s"][p] / _floor(r) for r in steps]
        ax2.barh(labels, widths, left=left, color=f"C{i}", label=PART_NAMES[p])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax2.axvline(1.0, color="k", lw=1)
    ax2.set_xlabel("step time in multiples of its floor")
    ax2.invert_yaxis()
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
