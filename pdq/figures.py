"""Matplotlib figures drawn off-screen (Agg) and returned as PNG bytes, for the report and the run's own plots.
matplotlib is imported when a figure is made, not with pdq."""

from __future__ import annotations

import io


def figure(nrows: int, ncols: int, w: float, h: float):
    """A figure of nrows x ncols panels of w x h inches each, and its axes (always a 2-D array)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()
