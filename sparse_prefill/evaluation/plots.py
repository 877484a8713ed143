"""Pictures of a whole-model evaluation (matplotlib, the ``plots`` extra).

:func:`plot_quality_vs_density` is the one that settles which pattern keeps more at the same cost:
KL against dense (and the perplexity change) against mean attention density, one curve per policy
and length, the points of a sweep joined in density order. :func:`plot_quality_vs_time` draws the same
against measured prefill time, the cost a user pays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.evaluation.selection import SelectionGrid
from sparse_prefill.evaluation.whole_model import Measurement

__all__ = ["plot_needle_heatmap", "plot_quality_vs_density", "plot_quality_vs_time", "plot_selection"]


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("plots need matplotlib: pip install 'sparse-prefill[plots]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve_name(m: Measurement) -> str:
    """A sweep's points share a curve (``anchor.yaml[theta=6.0]`` -> ``anchor.yaml``); guarded and unguarded
    runs of one policy are two curves, so a line never joins points of different kinds."""
    return m.label.split("[")[0] + (", guarded" if m.guard else "")


def _curves(results: Sequence[Measurement], cost: Callable[[Measurement], float | None]
            ) -> dict[tuple[str, int], list[Measurement]]:
    """Policy runs with a ``cost``, by (curve, length), each curve's points in cost order."""
    curves: dict[tuple[str, int], list[Measurement]] = {}
    for m in results:
        if m.label != BASELINE_LABEL and cost(m) is not None:
            curves.setdefault((_curve_name(m), m.length), []).append(m)
    for points in curves.values():
        points.sort(key=cost)
    return curves


def _plot_quality(results: Sequence[Measurement], path: str | Path, title: str,
                  cost: Callable[[Measurement], float | None], xlabel: str, dense_at: float | None) -> Path:
    """KL (log axis) and perplexity change against ``cost``, one line per (curve, length)."""
    plt = _pyplot()
    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.8))
    curves = _curves(results, cost)
    lengths = sorted({length for _, length in curves})
    styles = ["-", "--", ":", "-."]
    names = sorted({name for name, _ in curves})
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")  # no two curves share a colour
    colors = {name: palette(i % palette.N) for i, name in enumerate(names)}
    for (name, length), points in sorted(curves.items()):
        style = dict(color=colors[name], linestyle=styles[lengths.index(length) % len(styles)],
                     marker="s" if name.endswith(", guarded") else "o")
        label = f"{name}, {round(length / 1024)}k" if length >= 1024 else f"{name}, {length}"
        # KL 0 (every plan ran dense) has no place on a log axis: those points show in the perplexity panel.
        changed = [m for m in points if m.kl > 0]
        ax_kl.plot([cost(m) for m in changed], [m.kl for m in changed], label=label, **style)
        ax_ppl.plot([cost(m) for m in points], [100 * m.perplexity_change for m in points], label=label, **style)
    ax_kl.set(xlabel=xlabel, ylabel="mean KL(dense || policy) per position, nats", yscale="log",
              title="next-token distributions vs dense (KL 0 left out)")
    ax_ppl.axhline(0.0, color="grey", linewidth=0.8)
    ax_ppl.set(xlabel=xlabel, ylabel="perplexity vs dense (%)", title="perplexity")
    for ax in (ax_kl, ax_ppl):
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if dense_at is not None:
            ax.axvline(dense_at, color="grey", linewidth=0.8, linestyle=":")
    ax_ppl.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_quality_vs_density(results: Sequence[Measurement], path: str | Path, title: str = "") -> Path:
    """KL(dense || policy) and perplexity change vs mean density; one line per (policy, guarded or not,
    length), a policy's sweep points (``anchor.yaml[theta=6.0]``, ...) on one line."""
    return _plot_quality(results, path, title, lambda m: m.density,
                         "mean attention density (fraction of causal scores computed)", dense_at=None)


def plot_quality_vs_time(results: Sequence[Measurement], path: str | Path, title: str = "") -> Path:
    """The same against the whole model's prefill time as a fraction of dense's (measured in the same run):
    what a user pays, identification, tests and dense fallbacks included. Dense sits at 1."""
    return _plot_quality(results, path, title, lambda m: m.prefill_vs_dense,
                         "prefill time / dense prefill time (same run)", dense_at=1.0)


def plot_needle_heatmap(results: Sequence[Measurement], path: str | Path, title: str = "") -> Path:
    """One panel per label (titled with the whole label): needle found (green) or missed (red) by length and
    depth."""
    plt = _pyplot()
    labels = list(dict.fromkeys(m.label for m in results if m.needle))
    if not labels:
        raise ValueError("no needle results to draw (the evaluation ran with no needle depths)")
    lengths = sorted({m.length for m in results if m.needle})
    depths = sorted({float(d) for m in results for d in m.needle})
    columns = min(4, len(labels))
    rows = -(-len(labels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 0.6 * len(depths) + 1.6 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for m in results:
            if m.label == label:
                for depth, found in m.needle.items():
                    grid[depths.index(float(depth))][lengths.index(m.length)] = 1.0 if found else 0.0
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        # Whole labels, in lines of 32 characters: a sweep's labels differ at their end.
        ax.set(xlabel="length", ylabel="depth", title="\n".join(label[i:i + 32] for i in range(0, len(label), 32)))
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_selection(grids: Mapping[str, SelectionGrid], path: str | Path, title: str = "") -> Path:
    """One head's attention mass (log scale), then, per labelled plan of that head, the fraction of
    each tile it computes: stripes beside blocks beside windows, on the same real prompt."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    if not grids:
        raise ValueError("plot_selection needs at least one grid")
    first = next(iter(grids.values()))
    fig, axes = plt.subplots(1, len(grids) + 1, figsize=(4.6 * (len(grids) + 1), 4.6), squeeze=False)
    extent = (0, first.mass.shape[1] * first.cell, first.mass.shape[0] * first.cell, 0)
    positive = first.mass[first.mass > 0]
    floor = max(float(positive.min()), 1e-6) if positive.numel() else 1e-6
    image = axes[0, 0].imshow(first.mass.clamp(min=floor).numpy(), norm=LogNorm(vmin=floor, vmax=1.0), cmap="magma",
                              extent=extent, interpolation="nearest")
    fig.colorbar(image, ax=axes[0, 0], fraction=0.046)
    axes[0, 0].set(title="attention mass per tile (mean row)", xlabel="key position", ylabel="query position")
    for ax, (label, grid) in zip(axes[0, 1:], grids.items()):
        image = ax.imshow(grid.selected.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", extent=extent,
                          interpolation="nearest")
        ax.set(title=f"{label}\nrecall {grid.recall:.3f}, density {grid.density:.3f}", xlabel="key position")
    fig.colorbar(image, ax=axes[0, -1], fraction=0.046, label="fraction of the tile computed")
    fig.suptitle(title or f"query head {first.head}, {first.cell}x{first.cell} tiles")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
