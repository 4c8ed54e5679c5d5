"""The sweep's figure: accuracy (with its interval as an error bar) against compute and against the target's share
of the steps, every point labelled, no two labels overlapping."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

REFERENCES = (("target", "*", "tab:red"), ("draft", "s", "tab:green"))
PANELS = (
    ("flops_vs_target", "FLOPs relative to target-only"),
    ("target_step_share", "share of steps written by the target"),
)
# Label offsets tried around a point, nearest first (points of the display: 1/72 inch).
RADII = (6, 12, 20, 30, 42, 56, 72, 90)
ANGLES = (45, -45, 135, -135, 0, 180, 90, -90, 20, -20, 160, -160, 65, -65, 115, -115)


def short_labels(summaries: Sequence[dict]) -> list[str]:
    """Each point's label without the parts every point shares ("threshold,delta=0.7" -> "delta=0.7")."""
    names = [s.get("label") or s["method"].removeprefix("rsd[").removesuffix("]") for s in summaries]
    parts = [name.split(",") for name in names]
    shared = set.intersection(*(set(p) for p in parts)) if len(parts) > 1 else set()
    return [",".join(part for part in p if part not in shared) or ",".join(p) for p in parts]


def error_bar(s: dict) -> tuple[float, float]:
    """(below, above) the accuracy: its interval as an asymmetric error bar; none without an interval."""
    ci = s.get("accuracy_ci")
    if not ci:
        return 0.0, 0.0
    return max(s["accuracy"] - ci[0], 0.0), max(ci[1] - s["accuracy"], 0.0)


def overlaps(a, b, pad: float = 1.0) -> bool:
    return not (a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0)


def overlap_area(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], obstacles: Sequence = ()) -> list:
    """Annotate every point with its text at the nearest offset where the label's box overlaps no other label,
    no point's marker and no error bar, and stays inside the axes; a label set off its point gets a leader line.
    Where no offset is free (very dense sweeps), the least-overlapping one is used. Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = list(obstacles)
    placed = []
    for (x, y), text in sorted(zip(points, texts, strict=True), key=lambda pair: (pair[0][0], -pair[0][1])):
        best = None  # (cost, annotation, box)
        for radius, angle in ((r, a) for r in RADII for a in ANGLES):
            offset = (radius * math.cos(math.radians(angle)), radius * math.sin(math.radians(angle)))
            artist = label_artist(ax, (x, y), text, offset, leader=radius > RADII[0])
            box = text_box(artist, renderer)
            outside = not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1)
            cost = 1e9 * outside + sum(overlap_area(box, other) for other in taken)
            cost += 1e6 * sum(overlaps(box, other) for other in taken)  # touching counts, not only covering
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, artist, box)
            else:
                artist.remove()
            if best[0] == 0:
                break
        taken.append(best[2])
        placed.append(best[1])
    return placed


def text_box(annotation, renderer):
    """The display box of an annotation's text alone (its leader line may cross markers and other lines)."""
    from matplotlib.text import Text

    annotation.get_window_extent(renderer)  # places the text for this renderer
    return Text.get_window_extent(annotation, renderer)


def label_artist(ax, xy: tuple[float, float], text: str, offset: tuple[float, float], leader: bool):
    """One label, `offset` points from its point, aligned so it grows away from the point."""
    dx, dy = offset
    ha = "left" if dx > 1 else "right" if dx < -1 else "center"
    va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
    arrow = {"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 2} if leader else None
    return ax.annotate(
        text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=7, ha=ha, va=va, arrowprops=arrow, zorder=5
    )


def marker_boxes(ax, points: Sequence[tuple[float, float]], bars: Sequence[tuple[float, float]], radius_pt: float):
    """The display boxes of each point's marker and error bar: labels must keep off them."""
    from matplotlib.transforms import Bbox

    radius = radius_pt * ax.figure.dpi / 72.0
    boxes = []
    for (x, y), (below, above) in zip(points, bars, strict=True):
        cx, cy = ax.transData.transform((x, y))
        boxes.append(Bbox([[cx - radius, cy - radius], [cx + radius, cy + radius]]))
        if below or above:
            _, low = ax.transData.transform((x, y - below))
            _, high = ax.transData.transform((x, y + above))
            boxes.append(Bbox([[cx - 2.5, low], [cx + 2.5, high]]))
    return boxes


def sweep_points(summaries: Sequence[dict], key: str) -> list[dict]:
    """The RSD points of a panel (everything but the reference methods), in order of x."""
    sweep = [s for s in summaries if s["method"] not in ("target", "draft") and s.get(key) is not None]
    return sorted(sweep, key=lambda s: s[key])


def line_boxes(ax, points: Sequence[tuple[float, float]], step_px: float = 4.0):
    """Small display boxes along the line joining the points in order, so labels keep off it too."""
    from matplotlib.transforms import Bbox

    corners = [ax.transData.transform(p) for p in points]
    boxes = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:], strict=False):
        count = max(int(math.hypot(x1 - x0, y1 - y0) / step_px), 1)
        for i in range(count + 1):
            x, y = x0 + (x1 - x0) * i / count, y0 + (y1 - y0) * i / count
            boxes.append(Bbox([[x - 1.5, y - 1.5], [x + 1.5, y + 1.5]]))
    return boxes


def draw_panel(ax, summaries: Sequence[dict], key: str, label: str) -> None:
    """One panel: the RSD points joined in order of x, the reference methods, error bars (labels come later)."""
    sweep = sweep_points(summaries, key)
    if sweep:
        xs, ys = [s[key] for s in sweep], [s["accuracy"] for s in sweep]
        bars = [error_bar(s) for s in sweep]
        ax.errorbar(xs, ys, yerr=list(zip(*bars, strict=True)), fmt="o-", color="tab:blue", ms=4, capsize=2.5,
                    elinewidth=0.8, label="RSD")  # fmt: skip
    for name, marker, color in REFERENCES:
        ref = next((s for s in summaries if s["method"] == name and s.get(key) is not None), None)
        if ref:
            below, above = error_bar(ref)
            ax.errorbar([ref[key]], [ref["accuracy"]], yerr=[[below], [above]], fmt=marker, color=color,
                        markersize=10, capsize=2.5, elinewidth=0.8, label=f"{name}-only")  # fmt: skip
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(x=0.12, y=0.15)


def label_panel(ax, summaries: Sequence[dict], key: str) -> list:
    """Label every RSD point of a drawn panel, keeping off markers, error bars, the legend and other labels."""
    sweep = sweep_points(summaries, key)
    if not sweep:
        return []
    renderer = ax.figure.canvas.get_renderer()
    plotted = [s for s in summaries if s.get(key) is not None]
    points = [(s[key], s["accuracy"]) for s in plotted]
    obstacles = marker_boxes(ax, points, [error_bar(s) for s in plotted], radius_pt=5)
    obstacles += line_boxes(ax, [(s[key], s["accuracy"]) for s in sweep])
    legend = ax.get_legend()
    if legend is not None:
        obstacles.append(legend.get_window_extent(renderer))
    return place_labels(ax, [(s[key], s["accuracy"]) for s in sweep], short_labels(sweep), obstacles)


def plot_title(summaries: Sequence[dict], problems: str) -> str:
    counts = sorted({s["n"] for s in summaries})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"RSD on {problems}: n = {n} problems per point; error bars: 95% Wilson intervals"


def tradeoff_figure(summaries: Sequence[dict], problems: str = ""):
    """The figure and, per panel, its point labels (the layout is final before labels are placed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        draw_panel(ax, summaries, key, label)
    fig.suptitle(plot_title(summaries, problems or "the problems"), fontsize=11)
    fig.tight_layout()
    fig.canvas.draw()  # fixes limits and positions, so display coordinates are final
    labels = [label_panel(ax, summaries, key) for ax, (key, _) in zip(axes, PANELS, strict=True)]
    return fig, labels


def plot_tradeoff(summaries: Sequence[dict], path: str | Path, problems: str = "") -> Path:
    """Accuracy against FLOPs (relative to target-only) and against the target's step share; saved as a PNG."""
    import matplotlib.pyplot as plt

    fig, _ = tradeoff_figure(summaries, problems)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
