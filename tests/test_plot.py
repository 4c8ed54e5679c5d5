"""The sweep figure: every point labelled, no label over another or over a point, error bars, n in the title."""

from __future__ import annotations

import itertools

import pytest

from rsd.eval.plot import short_labels, tradeoff_figure
from rsd.eval.stats import wilson_interval


def point(method: str, correct: int, n: int, flops: float, share: float | None) -> dict:
    low, high = wilson_interval(correct, n)
    return {"method": method, "n": n, "accuracy": correct / n, "accuracy_ci": [low, high],
            "flops_vs_target": flops, "target_step_share": share}  # fmt: skip


# A dense sweep like the tiny world's: low deltas sit on top of each other in both panels.
SWEEP = [
    point("target", 200, 200, 1.0, 1.0),
    point("draft", 111, 200, 0.10, 0.0),
    *(
        point(f"rsd[threshold,delta={d}]", c, 200, f, s)
        for d, c, f, s in [(0.1, 196, 0.470, 0.01), (0.2, 196, 0.471, 0.012), (0.3, 196, 0.475, 0.015),
                           (0.5, 197, 0.49, 0.05), (0.6, 197, 0.50, 0.08), (0.7, 197, 0.51, 0.105),
                           (0.8, 199, 0.62, 0.25), (0.9, 200, 0.81, 0.55), (0.95, 200, 0.96, 0.9)]
    ),
]  # fmt: skip


def test_short_labels_drop_the_shared_parts():
    assert short_labels(SWEEP[2:5]) == ["delta=0.1", "delta=0.2", "delta=0.3"]
    assert short_labels([{"method": "rsd", "label": "sigmoid,alpha=10"}]) == ["sigmoid,alpha=10"]


def test_every_point_is_labelled_and_no_label_overlaps_another_or_a_point():
    import matplotlib.pyplot as plt

    fig, panels = tradeoff_figure(SWEEP, problems="tinyworld")
    try:
        from matplotlib.text import Text

        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax, labels in zip(fig.axes, panels, strict=True):
            assert sorted(a.get_text() for a in labels) == sorted(short_labels(SWEEP[2:]))
            boxes = [Text.get_window_extent(a, renderer) for a in labels]  # the text, not its leader
            for first, second in itertools.combinations(boxes, 2):
                assert not first.overlaps(second), (first, second)
            frame = ax.get_window_extent(renderer)
            markers = [ax.transData.transform(xy) for xy in zip(*ax.lines[0].get_data(), strict=True)]
            for box in boxes:
                assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                assert not any(box.contains(x, y) for x, y in markers)
            assert len(ax.collections) >= 3  # the error bars: RSD's, the target's and the draft's
        title = fig._suptitle.get_text()
        assert "tinyworld" in title and "n = 200" in title and "95%" in title
    finally:
        plt.close(fig)


def test_error_bars_are_the_wilson_intervals():
    import matplotlib.pyplot as plt

    fig, _ = tradeoff_figure(SWEEP, problems="tinyworld")
    try:
        ax = fig.axes[0]
        bars = ax.collections[0].get_segments()  # RSD's error bars, in order of x
        rsd_points = sorted(SWEEP[2:], key=lambda s: s["flops_vs_target"])
        for segment, s in zip(bars, rsd_points, strict=True):
            (_, low), (_, high) = segment
            assert (low, high) == pytest.approx(s["accuracy_ci"], abs=1e-9)
    finally:
        plt.close(fig)
