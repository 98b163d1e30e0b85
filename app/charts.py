"""Vega-Lite charts for the app, handed to ``gr.Plot`` as ready specs.

Why not ``gr.BarPlot``: Gradio's native plots stack bars that share an x value (they have no ``xOffset``), and on a
new value they swap only the data, keeping the colour domain and sort order of the first render, so bars of a series
that appears later (the tuned scores) are not drawn. ``gr.Plot`` renders any Vega-Lite spec with the Vega build
Gradio ships (as for Altair charts), so grouped bars need no plotting package on the server.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from gradio.components.plot import AltairPlotData, PlotData

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
ZERO_SHOT, TUNED = "zero-shot", "tuned prompts"
METHOD_COLORS = {ZERO_SHOT: "#f59e0b", TUNED: "#2563eb"}  # amber / blue: apart for common colour blindness
MUTED = "#6b7280"  # axis text readable on the light and the dark theme
SERIES_COLORS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0ea5e9", "#84cc16", "#ec4899"]


def _config() -> dict:
    """Theme-neutral styling: grey text and grid that read on Gradio's light and dark themes."""
    axis = {"labelColor": MUTED, "titleColor": MUTED, "gridColor": "#e5e7eb33", "domainColor": MUTED,
            "tickColor": MUTED, "titleFontWeight": "normal"}
    return {"axis": axis, "legend": {"labelColor": MUTED, "titleColor": MUTED}, "view": {"stroke": None},
            "title": {"color": MUTED}}


def _plot(spec: dict, chart: str) -> PlotData:
    """A spec as gr.Plot's value. Naming the chart kind makes Gradio size it to the plot's width (a Vega "container"
    width collapses in Gradio's centred plot box) and apply the page theme's fonts and colours; the config here is
    the fallback for any other renderer."""
    spec = {"$schema": SCHEMA, "autosize": {"type": "fit", "contains": "padding"}, "background": "transparent",
            "padding": {"top": 28, "left": 5, "right": 5, "bottom": 5},  # clear of gr.Plot's label, top left
            "config": _config(), **spec}
    return AltairPlotData(chart=chart, plot=json.dumps(spec))


def comparison_chart(rows: Sequence[tuple[str, str, float]], class_order: Sequence[str]) -> PlotData:
    """Grouped bars: per class (x, in ``class_order``), one bar per method side by side, a legend naming them.

    ``rows`` are (class, method, score) with method ``ZERO_SHOT`` or ``TUNED``."""
    methods = [m for m in (ZERO_SHOT, TUNED) if any(r[1] == m for r in rows)]
    values = [{"class": c, "method": m, "score": round(float(s), 4)} for c, m, s in rows]
    encoding = {
        "x": {"field": "class", "type": "nominal", "sort": list(class_order), "title": None,
              "axis": {"labelAngle": -35, "labelLimit": 140}},
        "xOffset": {"field": "method", "type": "nominal", "sort": methods},
        "y": {"field": "score", "type": "quantitative", "scale": {"domain": [0, 1]}, "title": "score"},
        "color": {"field": "method", "type": "nominal", "title": None,
                  "scale": {"domain": methods, "range": [METHOD_COLORS[m] for m in methods]},
                  "legend": {"orient": "bottom"}},  # at the top it would sit under gr.Plot's label
        "tooltip": [{"field": "class"}, {"field": "method"}, {"field": "score", "format": ".3f"}],
    }
    return _plot({"height": 260, "data": {"values": values}, "mark": {"type": "bar"}, "encoding": encoding}, "bar")


def timeline_chart(points: Sequence[dict], classes: Sequence[str]) -> PlotData:
    """Label scores over time: one line per class through the windows' mid-points, the window's caption in the
    tooltip. ``points``: {"time_s", "window", "class", "score", "caption"}."""
    encoding = {
        "x": {"field": "time_s", "type": "quantitative", "title": "time (s), window mid-point"},
        "y": {"field": "score", "type": "quantitative", "scale": {"domain": [0, 1]}, "title": "score"},
        "color": {"field": "class", "type": "nominal", "sort": list(classes), "title": None,
                  "scale": {"domain": list(classes), "range": SERIES_COLORS[:len(classes)]},
                  "legend": {"orient": "bottom", "columns": 3}},
        "tooltip": [{"field": "window"}, {"field": "class"}, {"field": "score", "format": ".3f"},
                    {"field": "caption"}],
    }
    # "scatter": Gradio's theming for it touches only the colour scale (its "line" theming expects layers).
    return _plot({"height": 220, "data": {"values": list(points)}, "mark": {"type": "line", "point": True},
                  "encoding": encoding}, "scatter")


def chart_values(plot: PlotData | dict) -> list[dict]:
    """The data rows of a chart made here (for tests and API clients: the /classify plot output holds them)."""
    spec = plot.plot if isinstance(plot, PlotData) else plot["plot"]
    return json.loads(spec)["data"]["values"]


__all__ = ["TUNED", "ZERO_SHOT", "chart_values", "comparison_chart", "timeline_chart"]
