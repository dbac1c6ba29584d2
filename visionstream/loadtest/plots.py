"""PNG charts of a load-test summary: latency percentiles and throughput over time, per-stream fps, ramp."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float("nan") if r[key] is None else r[key] for r in rows]


def _headroom(ax: Any) -> None:
    """Start the y axis at 0 and leave the top fifth free, so the legend covers no data."""
    top = ax.get_ylim()[1]
    ax.set_ylim(0, top * 1.25 if top > 0 else 1)


def plot_summary(
    summary: dict[str, Any], path: Path, *, title: str = "", ramp: dict[str, Any] | None = None
) -> Path:
    """Write the chart to `path` (Agg backend: no display needed) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["per_second"]
    streams = summary["per_stream"]
    n_panels = 4 if ramp else 3
    fig, axes = plt.subplots(n_panels, 1, figsize=(11, 3.3 * n_panels + 0.6), constrained_layout=True)
    axes[1].sharex(axes[0])
    t = [r["t"] + 0.5 for r in rows]  # plot each one-second bucket at its centre

    ax = axes[0]
    for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ax.plot(t, _series(rows, key), style, marker=".", label=f"{key}")
    ax.plot(t, _series(rows, "max"), color="0.6", linewidth=0.8, label="max")
    lat = summary["latency_ms"]
    if lat["p99"] is not None:
        ax.axhline(lat["p99"], color="C2", linewidth=0.8, alpha=0.6, label=f"p99 of run {lat['p99']:.0f} ms")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("Latency per second (by time the reply arrived)")
    _headroom(ax)
    ax.legend(loc="upper left", ncol=5, fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    if summary.get("step_offered"):  # a ramp: the schedule changes step by step
        edges = [*summary["step_starts"], summary["send_window_s"]]
        ax.stairs(summary["step_offered"], edges, baseline=None, color="0.5", linestyle=":", linewidth=1,
                  label="offered (schedule)")
    else:
        ax.axhline(summary["offered_fps"], color="0.5", linestyle=":", linewidth=1, label="offered (schedule)")
    ax.plot(t, [r["sent"] for r in rows], "-", marker=".", label="sent")
    ax.plot(t, [r["results"] for r in rows], "-", marker=".", label="results (achieved)")
    ax.bar(t, [r["dropped"] for r in rows], width=0.8, color="C3", alpha=0.35, label="dropped")
    ax.axvline(summary["send_window_s"], color="0.4", linestyle="--", linewidth=0.8)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("frames per second")
    ax.set_title(summary.get("timeline_title") or f"Throughput: offered {summary['offered_fps']:.1f} fps, "
                 f"achieved {summary['achieved_fps']:.1f} fps")
    for b in summary.get("step_starts", [])[1:]:
        for a in axes[:2]:
            a.axvline(b, color="0.8", linewidth=0.8)
    _headroom(ax)
    ax.legend(loc="upper left", ncol=4, fontsize=8)
    ax.text(summary["send_window_s"], ax.get_ylim()[1] * 0.97, "sending stops ", fontsize=8,
            va="top", ha="right", color="0.3")
    ax.grid(alpha=0.3)

    ax = axes[2]
    x = list(range(len(streams)))
    names = [s["name"] for s in streams]
    ax.bar([i - 0.2 for i in x], [s["offered_fps"] for s in streams], width=0.4, color="0.75",
           label="offered")
    ax.bar([i + 0.2 for i in x], [s["achieved_fps"] for s in streams], width=0.4, color="C0",
           label="achieved")
    ax.set_xticks(x)
    crowded = len(names) > 8
    ax.set_xticklabels(names, rotation=30 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    jain = summary["fairness"]["jain_all"]
    ax.set_title(summary.get("streams_title", "Per-stream fps")
                 + ("" if jain is None else f" (Jain index over achieved fps {jain:.3f})"))
    ax.set_ylabel("frames per second")
    _headroom(ax)
    ax.legend(loc="upper right", ncol=2, fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    if ramp:
        ax = axes[3]
        steps = ramp["steps"]
        off = [s["offered_fps"] for s in steps]
        ach = [s["achieved_fps"] for s in steps]
        ax.plot(off, ach, "-o", label="achieved fps")
        ax.plot(off, off, color="0.6", linestyle="--", linewidth=0.8, label="ideal (achieved = offered)")
        ax.set_xlabel("offered fps (all streams)")
        if len(off) > 1 and min(off) > 0 and max(off) / min(off) >= 4:
            ax.set_xscale("log", base=2)  # doubling steps: evenly spaced
            ax.set_xticks(off, [f"{v:g}" for v in off])
            ax.minorticks_off()
        ax.set_ylabel("achieved fps")
        ax2 = ax.twinx()
        ax2.plot(off, [s["latency_ms"]["p95"] or float("nan") for s in steps], "-s", color="C3",
                 label="p95 latency")
        ax2.set_ylabel("p95 latency (ms)", color="C3")
        if ramp.get("knee") is not None:
            k = ramp["knee"]
            ax.axvline(k["offered_fps"], color="C2", linestyle=":")
            ax.annotate(f"knee: {k['achieved_fps']:.1f} fps, p95 {k['latency_ms']['p95']:.0f} ms",
                        (k["offered_fps"], k["achieved_fps"]), textcoords="offset points", xytext=(8, 8),
                        fontsize=8)
        ax.set_title("Load ramp (saturation point)")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)

    if title:
        fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
