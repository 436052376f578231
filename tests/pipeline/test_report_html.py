"""The HTML report: what the collector records, the layout, the page, and a real browser."""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import graphpress as gp
from graphpress.pipeline.report import Report
from graphpress.pipeline.report_html import ADDED, CHANGED, REMOVED, graph_views, render_html
from graphpress.pipeline.report_layout import layered_layout
from graphpress.testing.zoo import get_model

from .chromium import Browser, find_chromium


class ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def compiled() -> gp.CompiledModel:
    torch.manual_seed(0)
    model, x = ConvBN().eval(), torch.randn(2, 3, 8, 8)
    return gp.compile(model, (x,), passes=["fold_bn", "prune_channels(ratio=0.5)", "dce",
                                           gp.passes.InsertFakeQuant(gp.quant.int8_static())],
                      calibration_data=[(torch.randn(2, 3, 8, 8),) for _ in range(2)])


def test_layout_puts_every_edge_downwards_and_boxes_apart() -> None:
    edges = [(0, 2), (1, 2), (2, 3), (3, 4), (2, 4), (5, 4)]
    widths = [40.0, 60.0, 50.0, 50.0, 80.0, 30.0]
    layout = layered_layout(widths, edges, gap=10.0)
    assert all(layout.y[b] > layout.y[a] for a, b in edges)
    assert layout.ranks[5] == layout.ranks[4] - 1  # a weight sits just above its user
    by_rank: dict[int, list[int]] = {}
    for node, rank in enumerate(layout.ranks):
        by_rank.setdefault(rank, []).append(node)
    for nodes in by_rank.values():
        nodes.sort(key=lambda v: layout.x[v])
        for a, b in itertools.pairwise(nodes):
            assert layout.x[b] - layout.x[a] >= (widths[a] + widths[b]) / 2 + 10.0 - 1e-9
    assert min(layout.x[v] - widths[v] / 2 for v in range(6)) == pytest.approx(0.0)


def test_layout_survives_a_cycle_and_scales() -> None:
    assert len(layered_layout([10.0] * 3, [(0, 1), (1, 2), (2, 0)]).x) == 3
    count = 3000  # a chain with a weight per node: a few thousand nodes
    edges = [(i, i + 1) for i in range(0, count - 2, 2)] + [
        (i + 1, i + 2) for i in range(0, count - 2, 2)]
    layout = layered_layout([50.0] * count, edges)
    assert layout.height > 0 and len(layout.x) == count


def test_collector_marks_what_each_pass_did(compiled: gp.CompiledModel) -> None:
    report = compiled.report()
    assert [g["record"] for g in report.graphs] == [None, 0, 1, 3]  # dce changed nothing
    folded = report.graphs[1]
    assert {"batch_norm"} <= set(folded["removed"])
    # the conv's weight and bias are new tensors; relu now reads the conv
    assert set(folded["changed"]) == {"p_conv_weight", "p_conv_bias", "relu"}
    assert folded["added"] == []
    pruned = report.graphs[2]
    assert not pruned["added"] and not pruned["removed"] and "conv2d" in pruned["changed"]
    nodes = {n["n"]: n for n in report.graphs[2]["graph"]}
    assert nodes["conv2d"]["s"] == "f32[2, 4, 6, 6]" and nodes["conv2d"]["m"] == "conv"
    quantized = report.graphs[3]
    assert any(n.startswith("fake_quantize_affine") for n in quantized["added"])
    fq = next(n for n in quantized["graph"] if n["n"].startswith("fake_quantize_affine"))
    assert fq["p"] == "insert_fake_quant" and fq["t"] == "graphpress.fake_quantize_affine"


def test_charts_data_prune_groups_and_quantization(compiled: gp.CompiledModel) -> None:
    charts = {c["kind"]: c for c in compiled.report().charts}
    assert charts["pruning"]["record"] == 1
    assert [(g["size"], g["kept"]) for g in charts["pruning"]["groups"]] == [(8, 4)]
    operands = charts["quantization"]["operands"]
    assert {o["role"] for o in operands} == {"weight", "activation"}
    for o in (o for o in operands if o["role"] == "weight"):
        low, high = o["representable"]  # min-max over the weight itself: within a step
        slack = (high - low) / 100
        assert low - slack <= o["observed"][0] and o["observed"][1] <= high + slack
        assert o["sqnr_db"] is None or 20 < o["sqnr_db"] < 80  # int8: ~6 dB per bit


def test_views_mark_added_removed_changed(compiled: gp.CompiledModel) -> None:
    views = graph_views(compiled.report())
    assert [v["title"] for v in views] == ["traced program", "01 fold_bn",
                                           "02 prune_channels", "04 insert_fake_quant"]
    fold = views[1]
    status = {row[5]: row[3] for row in fold["nodes"]}
    assert status["batch_norm"] == REMOVED and status["relu"] == CHANGED
    assert status["conv2d"] == 0 and ADDED not in status.values()
    assert fold["counts"]["removed"] == sum(s == REMOVED for s in status.values())
    index = {row[5]: i for i, row in enumerate(fold["nodes"])}
    edges = {(a, b): kind for a, b, kind in fold["edges"]}
    assert edges[(index["conv2d"], index["batch_norm"])] == REMOVED
    assert edges[(index["conv2d"], index["relu"])] == ADDED


def test_page_is_self_contained(compiled: gp.CompiledModel, tmp_path: Path) -> None:
    page = render_html(compiled.report())
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "fetch(" not in page
    assert page.count("data:image/svg+xml;base64,") == 3  # sizes, pruning, quantization
    path = compiled.report().save_html(tmp_path / "r" / "report.html")
    assert path.read_text(encoding="utf-8") == page


def test_report_json_round_trip_and_extend(compiled: gp.CompiledModel) -> None:
    report = compiled.report()
    again = Report.from_json(report.to_json())
    assert again.graphs == report.graphs and again.charts == report.charts
    assert [r.name for r in again.records] == [r.name for r in report.records]
    combined = Report.from_json(report.to_json())
    combined.extend(again, stage="second")
    combined.measure("model", accuracy=0.9, bytes=1000, latency_ms=0.5)
    assert len(combined.records) == 2 * len(report.records)
    assert combined.records[-1].name == "second/insert_fake_quant"
    assert combined.graphs[len(report.graphs)]["stage"] == "second"
    assert combined.charts[-1]["record"] == len(report.records) + 3
    titles = [v["title"] for v in graph_views(combined)]
    assert "traced program (second)" in titles and "08 second/insert_fake_quant" in titles
    page = render_html(combined)
    assert "Measured" in page and "90.00%" in page


def test_tokens_per_block_are_charted() -> None:
    from graphpress.pipeline.report_charts import tokens_chart

    title, svg = tokens_chart({"blocks": {"block 0": 197, "block 1": 189}}, "merge_tokens")
    assert title == "merge_tokens: tokens per block after merging" and svg.startswith("<?xml")


def test_merge_tokens_feeds_the_tokens_chart_with_its_counts() -> None:
    """A tiny ViT through merge_tokens(r=2): the chart holds, per block, the tokens its
    attention saw and those left after its merge, as the pass computed them."""
    model, inputs = get_model("hf_vit").make()
    compiled = gp.compile(model, inputs, passes="merge_tokens(r=2)")
    record = compiled.report().records[0]
    chart = next(c for c in compiled.report().charts if c["kind"] == "tokens")
    assert chart["record"] == 0
    names = list(chart["blocks"])
    assert [name.split(" (")[0] for name in names] == ["block 0", "block 1"]
    assert names[0].endswith("(vit.layers.0.attention)")
    tokens = record.stats["tokens_in"]  # 16 patches and the CLS token
    assert tokens == 17 and list(chart["attention"].values()) == [17, 15]
    assert list(chart["blocks"].values()) == [15, 13] == [
        t - 2 for t in chart["attention"].values()]
    assert list(chart["blocks"].values())[-1] == record.stats["tokens_out"]
    # the sequence the graph now carries after the last block is that count
    sizes = [n.meta["val"].shape[1] for n in compiled.program.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.aten.layer_norm.default]
    assert sizes[-1] == 13
    page = render_html(compiled.report())
    assert "merge_tokens: tokens per block after merging" in page


def test_weight_bytes_follow_packing() -> None:
    """fuse_dequant_matmul packs int4 weights: the size record of each pass is the program's
    real weight bytes, shown in the pass table and the size chart."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 32)).eval()
    compiled = gp.compile(model, (torch.randn(4, 64),), passes=[
        gp.passes.InsertFakeQuant(gp.quant.int4_weight_only(group_size=32)),
        "fuse_dequant_matmul"])
    report = compiled.report()
    sizes = [c["bytes"] for c in report.charts if c["kind"] == "size"]
    floats = sum(p.numel() * 4 for p in model.parameters())
    assert len(sizes) == 2 and sizes[0][0] == floats
    assert sizes[0][1] > floats  # fake-quant keeps the float weights and adds the qparams
    fused = report.records[1].stats  # the packed weights and their scales, then the biases
    assert sizes[1] == [sizes[0][1], fused["weight_bytes_after"] + 4 * (128 + 32)]
    assert sizes[1][1] < floats / 5
    page = render_html(report)
    assert "<th>weight bytes</th>" in page and "49.79kB → " in page
    from graphpress.pipeline.report_charts import cost_chart

    _, svg = cost_chart([{"name": r.name, "nodes": r.nodes, "parameters": r.parameters,
                          "macs": r.macs, "bytes": size}
                         for r, size in zip(report.records, sizes)])
    assert "weight bytes (traced: 49,792)" in svg


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path: Path) -> None:
    """Chromium opens the page with no console error; the screenshot shows the graph diff."""
    found = find_chromium()
    if found is None:
        pytest.skip("chromium and chromedriver are not installed "
                    "(apt-get install -y chromium chromium-driver)")
    from PIL import Image

    model, inputs = get_model("digits_cnn").make()
    compiled = gp.compile(model, inputs, passes=[
        "fold_bn", "prune_channels(ratio=0.5)", gp.passes.InsertFakeQuant(gp.quant.int8_static())],
        calibration_data=[inputs] * 4, verify=True)
    report = compiled.report()
    report.measure("trained", accuracy=0.99, bytes=40312, latency_ms=0.18)
    report.measure("compressed", accuracy=0.97, bytes=15432, latency_ms=0.09)
    page = report.save_html(tmp_path / "report.html")
    with Browser(*found, width=1400, height=1000) as browser:
        browser.open(page)
        assert browser.wait_for("return document.body.dataset.ready") == "1"
        drawn = browser.run("return document.querySelectorAll('#gp-graph g.node').length")
        view = graph_views(report)[1]
        assert drawn == len(view["nodes"]) > 0
        changed = browser.run("return document.querySelectorAll('#gp-graph g.s3').length")
        assert changed == sum(row[3] == CHANGED for row in view["nodes"]) > 0
        images = browser.run("return Array.from(document.images).map(i => i.naturalWidth)")
        assert len(images) == 6 and all(width > 100 for width in images)  # charts decoded
        browser.run("document.getElementById('graph-section').scrollIntoView(); return 1")
        graph_shot = browser.screenshot(tmp_path / "graph.png")
        browser.run("document.querySelector('.charts').scrollIntoView(); return 1")
        charts_shot = browser.screenshot(tmp_path / "charts.png")
        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert not errors, errors
        assert browser.run("return document.body.dataset.errors || ''") == ""
    with Image.open(graph_shot) as image:
        pixels = image.convert("RGB").getdata()
        orange = sum(1 for r, g, b in pixels if r > 200 and 120 < g < 160 and b < 80)
        green = sum(1 for r, g, b in pixels if r < 90 and g > 140 and b < 110)
    assert orange > 200 and green > 50  # changed and added nodes' borders are on screen
    if target := os.environ.get("GRAPHPRESS_SCREENSHOTS"):
        shutil.copy(graph_shot, Path(target) / "report-graph.png")
        shutil.copy(charts_shot, Path(target) / "report-charts.png")
