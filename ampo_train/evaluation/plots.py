"""PNG figures: pass@k curves of several models, and learning curves of several runs (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402


def plot_pass_at_k(reports: Sequence[dict], path: str | Path, spread: dict[str, dict] | None = None,
                   colors: dict[str, str] | None = None) -> Path:
    """One panel per benchmark (and ``overall``): pass@k against k (log scale), one line per model.

    ``spread``, when given, maps model -> benchmark -> k -> (low, high) drawn as a band (e.g. the
    min and max over seeds). ``colors`` fixes a colour per model (the same across figures).
    """
    panels = list(reports[0]["benchmarks"]) + (["overall"] if len(reports[0]["benchmarks"]) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for report in reports:
            summary = report["overall"] if panel == "overall" else report["benchmarks"][panel]
            ks = sorted(int(k) for k in summary["pass@k"])
            line, = ax.plot(ks, [summary["pass@k"][str(k)] for k in ks], marker="o", label=report["model"],
                            color=(colors or {}).get(report["model"]))
            band = (spread or {}).get(report["model"], {}).get(panel)
            if band:
                ax.fill_between(ks, [band[str(k)][0] for k in ks], [band[str(k)][1] for k in ks],
                                color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(panel)
        ax.set_xlabel("k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pass@k")
    axes[0][-1].legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def palette(labels: Sequence[str]) -> dict[str, str]:
    """One colour per label, in order, from matplotlib's default cycle."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


def _smooth(values: Sequence[float | None], window: int) -> list[float | None]:
    out: list[float | None] = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(recent) / len(recent) if recent else None)
    return out


LEARNING_PANELS = (("accuracy", "on-policy accuracy"), ("groups/all_wrong", "groups all wrong"),
                   ("guidance/fraction", "guided fraction of prompts"), ("entropy", "entropy"))


def plot_learning_curves(histories: dict[str, Sequence[dict]], path: str | Path, window: int = 10,
                         colors: dict[str, str] | None = None) -> Path:
    """Metrics per training step (``metrics.jsonl`` rows), moving average over ``window`` steps."""
    fig, axes = plt.subplots(1, len(LEARNING_PANELS), figsize=(3.6 * len(LEARNING_PANELS), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], LEARNING_PANELS):
        for label, rows in histories.items():
            ax.plot([r["step"] for r in rows], _smooth([r.get(key) for r in rows], window), label=label,
                    color=(colors or {}).get(label))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
