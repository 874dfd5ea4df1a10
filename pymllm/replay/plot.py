"""Hit rate against capacity, one line per eviction policy (matplotlib, an optional extra)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from pymllm.replay.simulator import Ideal, ReplayResult

INSTALL_HINT = 'pip install "pymllm[plot]" (from a checkout: pip install ".[plot]")'


def require_matplotlib() -> None:
    """Raise ``ImportError`` naming the ``plot`` extra unless matplotlib is installed
    (checked before a long replay, so a missing extra fails at once, not at the end)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"plotting needs matplotlib: {INSTALL_HINT}")


def check_plot_path(path: str | Path) -> None:
    """Raise before a long replay what saving a plot to *path* would raise after it:
    ``ImportError`` without matplotlib, ``ValueError`` for a format matplotlib cannot
    write (from the suffix) or a folder that does not exist."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix[1:].lower()
    if suffix not in formats:
        raise ValueError(
            f"plot: cannot save {str(path)!r}: the suffix must name a format matplotlib "
            f"writes ({', '.join(sorted(formats))})"
        )
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"plot: cannot save {str(path)!r}: no folder {str(parent)!r}")


def plot_hit_rates(
    results: Sequence[ReplayResult],
    path: str | Path,
    *,
    title: str,
    ideal: Ideal | None = None,
) -> None:
    """Save a PNG (or any format matplotlib infers from *path*'s suffix) of block hit rate
    against capacity on a log axis, one line per policy (policies with identical results
    share a line labelled with all their names). Unbounded runs are not points on
    that axis: the ideal (unbounded) rate is drawn as a dashed horizontal line instead."""
    require_matplotlib()
    # The Figure API needs no pyplot state and no GUI backend: it renders with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    unit = results[0].unit if results else "block"
    # Policies with the same hit rate at every capacity share one line, labelled with all
    # their names (drawn separately they would hide each other).
    curves: dict[tuple[tuple[int, float], ...], list[str]] = {}
    for pol in dict.fromkeys(r.policy for r in results):
        pts = sorted(
            (r.capacity, r.block_hit_rate) for r in results if r.policy == pol and r.capacity
        )
        if pts:
            curves.setdefault(tuple(pts), []).append(pol)
    for k, (curve, names) in enumerate(curves.items()):
        xs, ys = zip(*curve, strict=True)
        ax.plot(xs, ys, marker="osD^v<>"[k % 7], markersize=4, label=" = ".join(names))
    if ideal is not None:
        ax.axhline(
            ideal.block_hit_rate,
            linestyle="--",
            color="gray",
            label=f"unbounded (ideal) {ideal.block_hit_rate:.1%}",
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"cache capacity ({unit}s)")
    ax.set_ylabel("block hit rate")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)


__all__ = ["INSTALL_HINT", "check_plot_path", "plot_hit_rates", "require_matplotlib"]
