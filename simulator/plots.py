"""PNG plots of a run and of a sweep (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROLE_COLOURS = {
    "start": "#7f7f7f",
    "worker": "#1f77b4",
    "aggregate": "#2ca02c",
    "combine": "#ff7f0e",
    "unknown": "#bcbd22",
}
STATUS_MARKERS = {
    "timeout": ("X", "#d62728", "timeout"),
    "oom": ("v", "#9467bd", "out of memory"),
    "crash": ("x", "#000000", "crash"),
    "error": ("*", "#e377c2", "error"),
}
EVENT_LABELS = {"retry": "Lambda retry (attempt > 1)", "rescue": "watchdog rescue"}
OUTCOME_COLOURS = {
    "ok": "#2ca02c",
    "ok*": "#98df8a",
    "oom": "#9467bd",
    "timeout": "#d62728",
    "failed": "#000000",
    "exceeds-host": "#7f7f7f",
    "error": "#8c564b",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: a headless backend, whatever the environment says
    import matplotlib.pyplot as plt

    return plt


def plot_curves(report: Mapping[str, Any], path: str | Path) -> None:
    """Held-out loss and training loss per epoch, accuracy on a second axis."""
    plt = _pyplot()
    curve = report["training"]["curve"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    x = [c["epochs_done"] for c in curve]
    pairs = [(xi, c["loss"]) for xi, c in zip(x, curve, strict=True) if c["loss"] is not None]
    if pairs:
        ax.plot(*zip(*pairs, strict=True), "o-", color="#1f77b4", ms=3, label="held-out loss")
    train = [
        (xi, c["train_loss"]) for xi, c in zip(x, curve, strict=True) if c["train_loss"] is not None
    ]
    if train:
        ax.plot(*zip(*train, strict=True), "--", color="#aec7e8", label="training loss")
    ax.set_xlabel("epochs")
    ax.set_ylabel("cross-entropy loss")
    ax2 = ax.twinx()
    acc = [(xi, c["accuracy"]) for xi, c in zip(x, curve, strict=True) if c["accuracy"] is not None]
    if acc:
        ax2.plot(*zip(*acc, strict=True), "s-", color="#2ca02c", ms=3, label="held-out accuracy")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0.0, 1.0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    if lines[0] or lines2[0]:
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    st = report["settings"]
    ax.set_title(
        f"{st['model']} on {Path(str(st['dataset'])).name}, {st['workers']} workers, "
        f"{st['algorithm']} ({report['run']['status']})",
        fontsize=10,
    )
    if not curve:
        ax.text(0.5, 0.5, "no round was combined", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_timeline(report: Mapping[str, Any], path: str | Path) -> None:
    """Invocations per execution environment: as run on this laptop, and as laid out on Lambda."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    rows = report["timeline"]
    envs: dict[str, int] = {}
    for r in sorted(rows, key=lambda r: r["start_s"]):
        envs.setdefault(r["env"], len(envs))
    height = max(3.0, min(20.0, 1.2 + 0.18 * len(envs)))
    fig, axes = plt.subplots(2, 1, figsize=(11, 2 * height), dpi=100)
    panels = (
        ("this laptop (wall clock)", "start_s", "end_s"),
        (
            f"predicted on Lambda ({report['time']['efs_mode']} EFS): "
            f"{report['time']['predicted_s']:.2f} s",
            "predicted_start_s",
            "predicted_end_s",
        ),
    )
    for ax, (title, k0, k1) in zip(axes, panels, strict=True):
        seen_status: dict[str, Any] = {}
        for r in rows:
            t0, t1 = r.get(k0), r.get(k1)
            if t0 is None or t1 is None or not (math.isfinite(t0) and math.isfinite(t1)):
                continue
            y = envs[r["env"]]
            colour = ROLE_COLOURS.get(r["role"], ROLE_COLOURS["unknown"])
            width = max(t1 - t0, 1e-6)
            ax.barh(y, width, left=t0, height=0.7, color=colour, edgecolor="none")
            if r["cold"]:
                total = (r["init_ms"] or 0.0) + r["duration_ms"]
                frac = (r["init_ms"] or 0.0) / total if total > 0 else 0.0
                ax.barh(
                    y,
                    width * frac,
                    left=t0,
                    height=0.7,
                    color="none",
                    edgecolor="#000000",
                    hatch="////",
                    linewidth=0.0,
                )
            if r["attempt"] > 1:
                ax.plot([t0], [y], marker=">", color="#d62728", ms=5, ls="none")
                seen_status["retry"] = ax.lines[-1]
            if r.get("rescue"):
                ax.plot([t0], [y], marker="D", color="#e377c2", ms=5, ls="none")
                seen_status["rescue"] = ax.lines[-1]
            marker = STATUS_MARKERS.get(r["status"])
            if marker is not None:
                sym, col, _ = marker
                ax.plot([t1], [y], marker=sym, color=col, ms=7, ls="none")
                seen_status[r["status"]] = ax.lines[-1]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds since the start invoke")
        ax.set_ylabel("execution environment")
        ax.set_yticks(range(len(envs)))
        ax.set_yticklabels(
            [e[:8] for e in envs] if len(envs) <= 40 else [""] * len(envs), fontsize=6
        )
        ax.invert_yaxis()
        handles = [
            Patch(color=c, label=role) for role, c in ROLE_COLOURS.items() if role != "unknown"
        ]
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch="////", label="cold start")
        )
        for key, line in seen_status.items():
            label = EVENT_LABELS.get(key) or STATUS_MARKERS[key][2]
            line.set_label(label)
            handles.append(line)
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7)
        if not rows:
            ax.text(0.5, 0.5, "no invocations", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(
    rows: Sequence[Mapping[str, Any]], best: int | None, path: str | Path, title: str
) -> None:
    """Predicted time, cost and final loss per setting, coloured by outcome, best one starred."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    labels = [r["label"] for r in rows]
    xs = list(range(len(rows)))
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 0.7 * len(rows) + 3), 8), dpi=100, sharex=True)
    metrics = (
        ("predicted_s", "predicted time on Lambda (s)"),
        ("cost_usd", "cost (USD)"),
        ("final_loss", "final held-out loss"),
    )
    for ax, (key, name) in zip(axes, metrics, strict=True):
        for x, r in zip(xs, rows, strict=True):
            value = r.get(key)
            colour = OUTCOME_COLOURS.get(str(r["outcome"]), "#7f7f7f")
            if value is None:
                ax.text(
                    x,
                    0,
                    str(r["outcome"]),
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color=colour,
                    transform=ax.get_xaxis_transform(),
                )
                continue
            ax.bar(x, value, color=colour, width=0.7)
            if best is not None and x == best:
                ax.plot([x], [value], marker="*", color="#ffbf00", ms=16, mec="black", ls="none")
        ax.set_ylabel(name, fontsize=8)
    axes[-1].set_xticks(xs)
    axes[-1].set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    outcomes = sorted({str(r["outcome"]) for r in rows})
    handles = [Patch(color=OUTCOME_COLOURS.get(o, "#7f7f7f"), label=o) for o in outcomes]
    if best is not None:
        handles.append(
            axes[0].plot(
                [], [], marker="*", color="#ffbf00", mec="black", ls="none", ms=12, label="best"
            )[0]
        )
    axes[0].legend(handles=handles, fontsize=7, loc="upper right")
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["plot_curves", "plot_sweep", "plot_timeline"]
