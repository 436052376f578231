"""The report's charts: matplotlib figures rendered to SVG and embedded as data URIs.

Each function takes the report's JSON-ready chart data (see
:mod:`graphpress.pipeline.report_graph`) and returns ``(title, svg text)``. Figures are drawn
with the object API (``matplotlib.figure.Figure``, no pyplot state), text kept as SVG text and
a fixed hash salt, so the same report renders the same bytes. Long series are cut to
:data:`MAX_BARS` bars, and the title says which ones are shown.
"""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["MAX_BARS", "cost_chart", "measurement_charts", "pruning_chart",
           "quantization_chart", "tokens_chart"]

MAX_BARS = 60
_BLUE, _LIGHT, _ORANGE, _GREEN, _GREY = "#3b6fb6", "#c9d8ee", "#e08a2c", "#3f9a5a", "#9aa3ad"


def _svg(figure: Any) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "graphpress"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    figure.set_layout_engine("constrained")
    return figure


def _rows(count: int) -> float:
    return max(1.6, 0.6 + 0.22 * count)


def _style(axes: Any) -> None:
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    axes.tick_params(labelsize=8)


def cost_chart(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Nodes, parameters, MACs and (when every record has them) weight bytes after each pass,
    relative to the traced program."""
    figure = _figure(7.5, 2.8)
    axes = figure.add_subplot()
    labels = ["traced"] + [r["name"] for r in records]
    series = [("nodes", _GREY), ("parameters", _BLUE), ("macs", _ORANGE)]
    if all("bytes" in r for r in records):
        series.append(("bytes", _GREEN))
    for key, colour in series:
        first = records[0][key][0] or 1
        values = [100.0] + [100.0 * r[key][1] / first for r in records]
        axes.step(range(len(values)), values, where="post", color=colour, marker="o",
                  markersize=3,
                  label=f"{'weight bytes' if key == 'bytes' else key} "
                        f"(traced: {records[0][key][0]:,})")
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_ylabel("% of traced", fontsize=8)
    axes.legend(fontsize=7, frameon=False)
    _style(axes)
    return "Size after each pass", _svg(figure)


def pruning_chart(chart: dict[str, Any], pass_name: str) -> tuple[str, str]:
    groups = chart["groups"][:MAX_BARS]
    figure = _figure(7.5, _rows(len(groups)))
    axes = figure.add_subplot()
    names = [f"{g['name']} (+{g['coupled']} coupled)" for g in groups]
    positions = range(len(groups))
    axes.barh(positions, [g["size"] for g in groups], color=_LIGHT, label="channels before")
    axes.barh(positions, [g["kept"] for g in groups], color=_BLUE, label="kept")
    for i, g in enumerate(groups):
        axes.text(g["size"], i, f" {g['kept']}/{g['size']}", va="center", fontsize=7)
    axes.set_yticks(list(positions), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("channels", fontsize=8)
    axes.margins(x=0.12)
    axes.legend(fontsize=7, frameon=False, ncols=2, loc="lower left", bbox_to_anchor=(0, 1))
    _style(axes)
    more = len(chart["groups"]) - len(groups)
    suffix = f" (first {len(groups)} of {len(chart['groups'])})" if more > 0 else ""
    return f"{pass_name}: channels kept per group{suffix}", _svg(figure)


def quantization_chart(chart: dict[str, Any], pass_name: str) -> tuple[str, str]:
    """SQNR per quantized operand (left) and observed vs representable range (right)."""
    operands = sorted(chart["operands"], key=lambda o: (o["sqnr_db"] is None,
                                                         o["sqnr_db"] or 0.0))[:MAX_BARS]
    figure = _figure(9.0, _rows(len(operands)))
    sqnr_axes, range_axes = figure.subplots(1, 2, sharey=True, width_ratios=(1, 1))
    positions = list(range(len(operands)))
    finite = [o["sqnr_db"] for o in operands if o["sqnr_db"] is not None]
    cap = max(finite, default=60.0) * 1.1 or 60.0
    values = [o["sqnr_db"] if o["sqnr_db"] is not None else cap for o in operands]
    colours = [_BLUE if o["role"] == "weight" else _ORANGE for o in operands]
    sqnr_axes.barh(positions, values, color=colours)
    for i, o in enumerate(operands):
        text = "exact" if o["sqnr_db"] is None else f"{o['sqnr_db']:.1f}"
        sqnr_axes.text(values[i], i, f" {text}", va="center", fontsize=7)
    sqnr_axes.set_yticks(positions, [o["label"] for o in operands], fontsize=7)
    sqnr_axes.invert_yaxis()
    sqnr_axes.set_xlabel("SQNR dB (blue: weights, orange: activations)", fontsize=8)
    for i, o in enumerate(operands):
        low, high = o["representable"]
        range_axes.plot([low, high], [i, i], color=_LIGHT, linewidth=6,
                        solid_capstyle="butt", label="representable" if i == 0 else None)
        low, high = o["observed"]
        range_axes.plot([low, high], [i, i], color=colours[i], linewidth=2,
                        label="observed" if i == 0 else None)
    range_axes.set_xlabel("value range", fontsize=8)
    range_axes.legend(fontsize=7, frameon=False, ncols=2, loc="lower left",
                      bbox_to_anchor=(0, 1))
    for axes in (sqnr_axes, range_axes):
        _style(axes)
    more = len(chart["operands"]) - len(operands)
    suffix = f" (the {len(operands)} lowest of {len(chart['operands'])})" if more > 0 else ""
    return f"{pass_name}: quantization error and ranges per operand{suffix}", _svg(figure)


def tokens_chart(chart: dict[str, Any], pass_name: str) -> tuple[str, str]:
    """Tokens left after each block's merge (green) over those its attention saw (light),
    when the pass reports both (``chart["attention"]``)."""
    blocks = list(chart["blocks"].items())[:MAX_BARS]
    attention = chart.get("attention") or {}
    figure = _figure(7.5, 2.8)
    axes = figure.add_subplot()
    positions = range(len(blocks))
    if attention:
        axes.bar(positions, [attention.get(k, v) for k, v in blocks], color=_LIGHT,
                 label="tokens into the block (attention)")
    axes.bar(positions, [v for _, v in blocks], color=_GREEN,
             label="tokens after merging (MLP and next block)")
    for i, (name, value) in enumerate(blocks):
        text = f"{attention[name]}→{value}" if name in attention else f"{value}"
        axes.text(i, attention.get(name, value), text, ha="center", va="bottom", fontsize=7)
    axes.set_xticks(list(positions), [k for k, _ in blocks], rotation=30, ha="right",
                    fontsize=7)
    axes.set_ylabel("tokens", fontsize=8)
    axes.margins(y=0.15)
    if attention:
        axes.legend(fontsize=7, frameon=False, ncols=2, loc="lower left",
                    bbox_to_anchor=(0, 1))
    _style(axes)
    more = len(chart["blocks"]) - len(blocks)
    suffix = f" (first {len(blocks)} of {len(chart['blocks'])})" if more > 0 else ""
    return f"{pass_name}: tokens per block after merging{suffix}", _svg(figure)


_UNITS = {"accuracy": "accuracy (test set)", "cosine": "cosine vs original",
          "parameters": "parameters", "bytes": "bytes", "latency_ms": "latency ms"}


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def measurement_charts(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One bar chart per numeric figure measured across stages."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k, v in row.items() if k != "stage" and k not in keys
                    and isinstance(v, int | float) and not isinstance(v, bool))
    charts = []
    for key in keys:
        present = [(r["stage"], r[key]) for r in rows
                   if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if not present:
            continue
        figure = _figure(3.6, 0.8 + 0.32 * len(present))
        axes = figure.add_subplot()
        axes.barh(range(len(present)), [v for _, v in present], color=_BLUE)
        for i, (_, value) in enumerate(present):
            axes.text(value, i, f" {_number(value)}", va="center", fontsize=7)
        axes.set_yticks(range(len(present)), [s for s, _ in present], fontsize=7)
        axes.invert_yaxis()
        axes.margins(x=0.25)
        _style(axes)
        charts.append((_UNITS.get(key, key), _svg(figure)))
    return charts
