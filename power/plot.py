"""PNG plots (host side only; matplotlib is imported here, lazily, never by the daemon)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a plot is not a secret
        fig.savefig(tmp, dpi=90)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def timeline(results, path: Path, title: str) -> None:
    """Frequency, queue depth and power over time, one line per policy."""
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for r in results:
        tl = r.timeline
        if not tl:
            continue
        label = f"{r.policy} ({1e3 * r.energy_per_inference_j:.1f} mJ/inf, p99 {1e3 * r.pct(99):.0f} ms)"
        axes[0].step(tl["t"], tl["freq_hz"] / 1e9, where="mid", label=label, lw=0.8)
        axes[1].step(tl["t"], tl["queue"], where="mid", lw=0.8)
        axes[2].step(tl["t"], tl["power_w"], where="mid", lw=0.8)
    axes[0].set_ylabel("mean freq (GHz)")
    axes[1].set_ylabel("max queue")
    axes[2].set_ylabel("mean power (W)")
    axes[2].set_xlabel("time (s)")
    axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def pareto(curves: dict[str, list[tuple[float, float, str]]], path: Path, title: str) -> None:
    """curves[policy] = [(p99_ms, energy_mJ_per_inference, label)], one curve per policy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, pts in curves.items():
        pts = sorted(pts)
        # Frontier: points no other configuration beats on both p99 and energy.
        front, best = [], float("inf")
        for p in pts:
            if p[1] < best:
                front.append(p)
                best = p[1]
        line, = ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", ms=4, label=name)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=line.get_color(), alpha=0.4)
        for x, y, lab in pts:
            if lab:
                ax.annotate(lab, (x, y), fontsize=6, alpha=0.7)
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("energy per inference (mJ)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
