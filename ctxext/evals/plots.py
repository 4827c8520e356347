"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _perplexity_panel(
    ax,
    curves: dict[str, dict[int, float]],
    *,
    trained_context: int | None,
    styles: dict[str, dict] | None = None,
    context_label: bool = True,
) -> None:
    """Perplexity against context length on one axes: log2 x axis at the measured lengths, log y axis."""
    for name, points in curves.items():
        lengths = sorted(points)
        ax.plot(lengths, [points[L] for L in lengths], marker="o", label=name, **(styles or {}).get(name, {}))
    if trained_context:
        ax.axvline(
            trained_context,
            color="grey",
            linestyle=":",
            label=f"trained context ({trained_context})" if context_label else None,
        )
    ax.set_xscale("log", base=2)
    ticks = sorted({L for points in curves.values() for L in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_perplexity(
    curves: dict[str, dict[int, float]], path: Path, *, title: str, trained_context: int | None = None
) -> Path:
    """One line per model: perplexity against context length (log2 x axis)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _perplexity_panel(ax, curves, trained_context=trained_context)
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(
    before: dict[str, dict[int, float]],
    after: dict[str, dict[int, float]],
    path: Path,
    *,
    title: str,
    baseline: dict[int, float] | None = None,
    trained_context: int | None = None,
) -> Path:
    """Two panels sharing the y axis, without and with fine-tuning; one colour per method in both, the original
    model dashed black in both."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    names = list(dict.fromkeys([*before, *after]))
    styles = {n: {"color": plt.get_cmap("tab10")(i % 10)} for i, n in enumerate(names)}
    styles["original"] = {"color": "k", "linestyle": "--"}
    for ax, curves, label in ((axes[0], before, "no fine-tuning"), (axes[1], after, "same fine-tuning budget")):
        _perplexity_panel(
            ax,
            ({"original": baseline} if baseline else {}) | curves,
            trained_context=trained_context,
            styles=styles,
            context_label=False,
        )
        ax.set_title(label)
    axes[0].set_ylabel("perplexity (log scale)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_passkey(accuracy: dict[str, dict[str, float]], path: Path, *, title: str) -> Path:
    """Heatmap of passkey accuracy: rows = context length, columns = key depth."""
    lengths = list(accuracy)
    depths = list(next(iter(accuracy.values())))
    grid = np.array([[accuracy[L][d] for d in depths] for L in lengths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 1.2 + 0.6 * len(lengths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), depths)
    ax.set_yticks(range(len(lengths)), lengths)
    ax.set_xlabel("key depth (0 = start, 1 = end)")
    ax.set_ylabel("context length")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frequency_usage(
    panels: dict[str, np.ndarray], wavelengths: np.ndarray, path: Path, *, title: str, context_length: int | None = None
) -> Path:
    """One heatmap per panel (layer x rotation pair, mean over heads); pairs ordered high -> low frequency."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], panels.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("rotation pair (0 = highest frequency)")
        ax.set_ylabel("layer")
        ax.set_yticks(range(grid.shape[0]))
        if context_length is not None and np.isfinite(wavelengths).any():
            beyond = np.nonzero(wavelengths > context_length)[0]
            if beyond.size:
                ax.axvline(beyond[0] - 0.5, color="red", linestyle="--", linewidth=1)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title + ("" if context_length is None else f"  (red: wavelength > {context_length})"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_search(result: dict, path: Path) -> Path:
    """A factor search (``ctxext search``): every evaluation's calibration perplexity, the best so far and the best
    seed of each method (PI / NTK / YaRN shapes), where the gradient refinement starts (if any); the right panel
    zooms on the best so far against the best seed."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ppl = np.exp([e["fitness"] for e in result["evaluations"]])
    best = np.exp(result["best_so_far"])
    best_seed: dict[str, float] = {}
    for origin, fitness in result["seeds"].items():
        if fitness is not None:
            method = origin.split()[0]
            best_seed[method] = min(best_seed.get(method, np.inf), float(np.exp(fitness)))
    colours = {m: plt.get_cmap("tab10")(i + 1) for i, m in enumerate(sorted(best_seed))}
    ax = axes[0]
    ax.scatter(
        np.arange(len(ppl)),
        ppl,
        c=[e["generation"] for e in result["evaluations"]],
        cmap="viridis",
        s=12,
        label="candidate (colour: generation)",
    )
    finite = ppl[np.isfinite(ppl)]
    if finite.size:
        top = min(finite.max(), max(best_seed.values()) * 1.1) if best_seed else finite.max()
        ax.set_ylim(finite.min() * 0.97, top * 1.03)
    ax.set_yscale("log")
    ax.set_ylabel("calibration perplexity (log scale)")
    ax.set_title("every evaluation", fontsize=9)
    zoom = axes[1]
    if best_seed:
        seed_best = min(best_seed.values())
        zoom.set_ylim(best[-1] * 0.995, seed_best * 1.02)
        zoom.set_title(
            f"best so far: {best[-1]:.3f}, {best[-1] / seed_best - 1:+.1%} against the best seed", fontsize=9
        )
    refined = result.get("refine_steps", 0)
    for a in axes:
        a.plot(best, color="k", label="best so far")
        for method, value in best_seed.items():
            a.axhline(value, color=colours[method], linestyle="--", label=f"best {method} seed")
        if refined:  # every refine step is one point, plus the final one
            a.axvline(
                len(ppl) - refined - 1.5, color="grey", linestyle=":", label=f"{refined} gradient steps from here"
            )
        a.set_xlabel("evaluation")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    cal = result["calibration"]
    fig.suptitle(
        f"factor search x{result['scale']:g} to {result['target_length']} ({cal['windows']} x "
        f"{cal['window']} tokens of {cal['data']}{', PoSE proxy' if cal.get('proxy') else ''})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_by_position_and_length(
    perplexity: dict[str, dict[str, dict[int, float]]],
    accuracy: dict[str, dict[str, dict[int, tuple[float, float, float]]]],
    path: Path,
    *,
    title: str,
    trained_context: int,
    accuracy_label: str = "retrieval accuracy",
) -> Path:
    """One column per group (e.g. per extension factor), one colour per method in every panel.

    Top: perplexity of the tokens in each position bucket (x: the bucket's end position) against the position;
    bottom: accuracy against prompt length with Wilson intervals (``(accuracy, low, high)`` per length).
    """
    groups = list(dict.fromkeys([*perplexity, *accuracy]))
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 8), squeeze=False)
    names = list(dict.fromkeys(n for panels in (perplexity, accuracy) for g in panels.values() for n in g))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for col, group in enumerate(groups):
        top, bottom = axes[0][col], axes[1][col]
        for name, points in perplexity.get(group, {}).items():
            xs = sorted(points)
            top.plot(xs, [points[x] for x in xs], marker="o", markersize=3, label=name, color=colours[name])
        if perplexity.get(group):
            top.axvline(trained_context, color="grey", linestyle=":")
        top.set_yscale("log")
        top.set_xlabel("position (end of bucket)")
        top.set_title(f"{group}: perplexity by position")
        curves = accuracy.get(group, {})
        for i, (name, points) in enumerate(curves.items()):
            xs = sorted(points)
            acc = np.array([points[x][0] for x in xs])
            err = np.array([[points[x][0] - points[x][1] for x in xs], [points[x][2] - points[x][0] for x in xs]])
            shift = 2 ** (0.04 * (i - (len(curves) - 1) / 2))  # methods side by side, not on top of each other
            bottom.errorbar(
                [x * shift for x in xs], acc, yerr=err, marker="o", capsize=3, label=name, color=colours[name]
            )
        ticks = sorted({x for points in accuracy.get(group, {}).values() for x in points})
        if ticks:
            bottom.set_xscale("log", base=2)
            bottom.set_xticks(ticks, [str(t) for t in ticks])
        bottom.set_ylim(-0.05, 1.05)
        bottom.set_xlabel("prompt length (tokens)")
        bottom.set_title(f"{group}: {accuracy_label} (Wilson 95%)")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="grey")
    axes[0][0].set_ylabel("perplexity (log scale)")
    axes[1][0].set_ylabel("accuracy")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.91, hspace=0.3, wspace=0.18)  # tight_layout: 2 s
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
