"""The report as one self-contained HTML page.

:func:`render_html` writes the summary, the measured figures, the pass table (time, nodes,
parameters, MACs, weight bytes, contract, error, statistics, and where each pass did not apply
and why), a
graph viewer and the charts into one file. Nothing is fetched when the page opens: the style
sheet and the script (``report_assets/``, shipped in the package) are inlined, the charts are
matplotlib SVGs embedded as data URIs, and the graphs are JSON in the page.

The graph viewer shows, for each pass that changed the program, the union of the graph before
and after it, laid out once by :func:`graphpress.pipeline.report_layout.layered_layout` so that
"before", "after" and "diff" share positions; added nodes are green, removed red, changed
orange. The script draws the chosen view as SVG, zooms with the wheel, pans by dragging, finds
nodes by name or module path, and shows each node's op, shape, module path and creating pass
on hover.
"""

from __future__ import annotations

import base64
import html
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from graphpress.pipeline.report_layout import layered_layout

if TYPE_CHECKING:
    from graphpress.pipeline.report import PassRecord, Report

__all__ = ["graph_views", "render_html"]

SAME, ADDED, REMOVED, CHANGED = 0, 1, 2, 3
_MAX_LABEL = 38


def _asset(name: str) -> str:
    return resources.files("graphpress.pipeline").joinpath("report_assets", name).read_text(
        encoding="utf-8")


def _width(label: str) -> float:
    return min(len(label), _MAX_LABEL + 1) * 6.6 + 18


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"


def _view(title: str, before: list[dict[str, Any]] | None, entry: dict[str, Any]
          ) -> dict[str, Any]:
    after = entry["graph"]
    status = {name: ADDED for name in entry.get("added", [])}
    status.update({name: CHANGED for name in entry.get("changed", [])})
    removed = set(entry.get("removed", []))
    # removed nodes are appended: the layout places them by their edges of before
    nodes = list(after) + [{**n, "removed": True} for n in before or [] if n["n"] in removed]
    index = {n["n"]: i for i, n in enumerate(nodes)}
    before_edges = ({(a, n["n"]) for n in before for a in n["i"]} if before is not None
                    else set())
    after_edges = {(a, n["n"]) for n in after for a in n["i"]}
    edges = []
    for a, b in sorted(after_edges | before_edges, key=lambda e: (index.get(e[1], 0), e[0])):
        if a in index and b in index:
            kind = SAME if (a, b) in after_edges and (before is None or (a, b) in before_edges) \
                else (ADDED if (a, b) in after_edges else REMOVED)
            edges.append((index[a], index[b], kind))
    widths = [_width(n["t"]) for n in nodes]
    layout = layered_layout(widths, [(a, b) for a, b, _ in edges])
    rows = []
    for i, n in enumerate(nodes):
        state = REMOVED if n.get("removed") else status.get(n["n"], SAME)
        rows.append([round(layout.x[i], 1), round(layout.y[i], 1), round(widths[i], 1), state,
                     _short(n["t"]), n["n"], n["k"], n["s"], n["m"], n["p"], n["t"]])
    counts = {"added": len(entry.get("added", [])), "removed": len(removed),
              "changed": len(entry.get("changed", []))}
    return {"title": title, "nodes": rows, "edges": edges, "width": layout.width,
            "height": layout.height, "counts": counts, "diff": before is not None}


def graph_views(report: Report) -> list[dict[str, Any]]:
    """The graph viewer's views: the traced graph, then one per pass that changed it."""
    views = []
    previous: list[dict[str, Any]] | None = None
    for entry in report.graphs:
        record = entry.get("record")
        if record is None:
            stage = entry.get("stage")
            views.append(_view(f"traced program{f' ({stage})' if stage else ''}", None, entry))
        else:
            name = report.records[record].name if record < len(report.records) else "?"
            views.append(_view(f"{record + 1:02d} {name}", previous, entry))
        previous = entry["graph"]
    return views


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _pair(pair: tuple[int, int] | list[int]) -> str:
    a, b = pair
    return _count(a) if a == b else f"{_count(a)} → {_count(b)}"


def _bytes(pair: tuple[int, int]) -> str:
    a, b = pair
    return f"{_count(a)}B" if a == b else f"{_count(a)}B → {_count(b)}B"


def _error(record: PassRecord) -> str:
    text = "&ndash;" if record.max_error is None else f"{record.max_error:.2e}"
    if record.metrics:
        text += "<br><small>" + ", ".join(
            f"{_e(k)} {v:.4g}" for k, v in record.metrics.items()) + "</small>"
    return text


def _sizes(report: Report) -> dict[int, tuple[int, int]]:
    """Weight bytes (before, after) per record index, as the collector measured them."""
    return {chart["record"]: (int(chart["bytes"][0]), int(chart["bytes"][1]))
            for chart in report.charts if chart.get("kind") == "size"}


def _pass_rows(report: Report) -> str:
    rows = []
    sizes = _sizes(report)
    for i, r in enumerate(report.records):
        stats = ", ".join(f"{_e(k)}={_e(v)}" for k, v in r.stats.items())
        summary = "".join(f"<li>{_e(line)}</li>" for line in r.details.get("summary", []))
        skipped = "".join(f"<li><code>{_e(node)}</code>: {_e(why)}</li>"
                          for node, why in r.skipped)
        notes = ""
        if summary:
            notes += f"<details><summary>what it did</summary><ul>{summary}</ul></details>"
        if skipped:
            notes += (f"<details><summary>not applied at {len(r.skipped)} "
                      f"place{'s' * (len(r.skipped) != 1)}</summary><ul>{skipped}</ul>"
                      "</details>")
        tolerance = ("" if r.contract_kind in ("statistical", "unchecked") else
                     f"<br><small>rtol {r.contract_tolerance[0]:g}, atol "
                     f"{r.contract_tolerance[1]:g}</small>")
        rows.append(
            f"<tr class='{'changed' if r.changed else 'same'}'><td>{i + 1}</td>"
            f"<td><b>{_e(r.name)}</b>{'' if r.iteration == 1 else f' ({r.iteration})'}</td>"
            f"<td class=num>{r.seconds * 1e3:.1f}</td><td class=num>{_pair(r.nodes)}</td>"
            f"<td class=num>{_pair(r.parameters)}</td><td class=num>{_pair(r.macs)}</td>"
            f"<td class=num>{_bytes(sizes[i]) if i in sizes else '&ndash;'}</td>"
            f"<td title='{_e(r.contract)}'>{_e(r.contract_kind or r.contract)}{tolerance}</td>"
            f"<td class=num>{_error(r)}</td>"
            f"<td>{'changed' if r.changed else 'no change'}<br><small>{stats}</small>{notes}"
            "</td></tr>")
    return "".join(rows)


def _figure(value: Any, key: str) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        if key == "accuracy":
            return f"{value * 100:.2f}%"
        return f"{value:.4g}" if key != "bytes" else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _e(value)


def _measurements(report: Report) -> str:
    if not report.measurements:
        return ""
    keys: list[str] = []
    for row in report.measurements:
        keys.extend(k for k in row if k != "stage" and k not in keys)
    head = "".join(f"<th>{_e(k)}</th>" for k in ["stage", *keys])
    body = "".join("<tr><td>" + _e(row["stage"]) + "</td>" + "".join(
        f"<td class=num>{_figure(row.get(k), k)}</td>" for k in keys) + "</tr>"
        for row in report.measurements)
    return (f"<section><h2>Measured</h2><table class=grid><tr>{head}</tr>{body}</table>"
            "</section>")


def _charts(report: Report) -> list[tuple[str, str]]:
    from graphpress.pipeline import report_charts as charts

    made = []
    records = report.records
    sizes = _sizes(report)
    if records:
        made.append(charts.cost_chart([{"name": r.name, "nodes": r.nodes,
                                        "parameters": r.parameters, "macs": r.macs,
                                        **({"bytes": sizes[i]} if i in sizes else {})}
                                       for i, r in enumerate(records)]))
    draw = {"pruning": charts.pruning_chart, "quantization": charts.quantization_chart,
            "tokens": charts.tokens_chart}
    for chart in report.charts:
        if chart.get("kind") in draw:
            index = chart["record"]
            name = records[index].name if index < len(records) else chart["kind"]
            made.append(draw[chart["kind"]](chart, name))
    made.extend(charts.measurement_charts(report.measurements))
    return made


def _chart_html(made: list[tuple[str, str]]) -> str:
    items = []
    for title, svg in made:
        data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
        items.append(f"<figure class=chart><figcaption>{_e(title)}</figcaption>"
                     f"<img alt='{_e(title)}' src='data:image/svg+xml;base64,{data}'></figure>")
    return "".join(items)


def render_html(report: Report) -> str:
    """The whole page as a string (see the module docstring)."""
    from graphpress._version import __version__

    views = graph_views(report)
    payload = json.dumps({"views": views}, separators=(",", ":")).replace("</", "<\\/")
    extra = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
                    for k, v in report.extra.items())
    title = report.title or "graphpress report"
    no_graph = ("<p class=note>No graph was recorded for this report.</p>" if not views
                else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_asset("report.css")}</style></head>
<body><header><h1>{_e(title)}</h1>
<p>frontend <b>{_e(report.frontend)}</b> · backend <b>{_e(report.backend)}</b> ·
trace {report.trace_seconds * 1e3:.0f} ms · {len(report.records)} pass runs ·
graphpress {_e(__version__)}</p></header>
<div id="gp-error" hidden></div>
{_measurements(report)}
<section><h2>Passes</h2><table class=grid>
<tr><th>#</th><th>pass</th><th>ms</th><th>nodes</th><th>params</th><th>MACs</th>
<th>weight bytes</th><th>contract</th><th>max error</th><th>result</th></tr>
{_pass_rows(report)}</table>
<table class=extra>{extra}</table></section>
<section id="graph-section"><h2>Graph</h2>{no_graph}
<div class=controls><label>view <select id="gp-view"></select></label>
<span class=modes><label><input type=radio name=gp-mode value=diff checked> diff</label>
<label><input type=radio name=gp-mode value=before> before</label>
<label><input type=radio name=gp-mode value=after> after</label></span>
<button id="gp-fit" type=button>fit</button><button id="gp-in" type=button>+</button>
<button id="gp-out" type=button>&minus;</button>
<button id="gp-next" type=button>next change</button>
<input id="gp-find" type=search placeholder="find node or module">
<span id="gp-counts"></span></div>
<div class=legend><span class="key same">unchanged</span><span class="key added">added</span>
<span class="key removed">removed</span><span class="key changed">changed</span>
<span class="key weight">weight</span><span class="key input">input / output</span>
<span class=hint>wheel: zoom · drag: pan · hover: details</span></div>
<div id="gp-graph"><div id="gp-tip" hidden></div></div></section>
<section><h2>Charts</h2><div class=charts>{_chart_html(_charts(report))}</div></section>
<script type="application/json" id="gp-data">{payload}</script>
<script>{_asset("report.js")}</script></body></html>
"""
