/* graphpress report: the graph viewer. Inlined into every report page; uses no library.
 * Data: <script id="gp-data"> {views: [{title, nodes, edges, width, height, counts, diff}]},
 * a node = [x, y, width, status, label, name, kind, shape, module, pass, full label],
 * an edge = [source, target, status]; status 0 same, 1 added, 2 removed, 3 changed.
 * When the first view is drawn, body[data-ready] = "1"; a script error shows a banner and sets
 * body[data-errors]. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg", HEIGHT = 26;
  var STATUS = ["unchanged", "added", "removed", "changed"];
  var errors = 0;
  function fail(message) {
    errors += 1;
    document.body.dataset.errors = String(errors);
    var box = document.getElementById("gp-error");
    if (box) { box.hidden = false; box.textContent = "The graph viewer failed: " + message; }
  }
  window.addEventListener("error", function (event) { fail(event.message); });

  var data = JSON.parse(document.getElementById("gp-data").textContent);
  var views = data.views || [];
  var host = document.getElementById("gp-graph");
  var tip = document.getElementById("gp-tip");
  var select = document.getElementById("gp-view");
  var counts = document.getElementById("gp-counts");
  var state = {view: null, mode: "diff", scale: 1, tx: 0, ty: 0, svg: null, root: null,
               groups: [], changes: [], next: 0};

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var key in attrs) { node.setAttribute(key, attrs[key]); }
    if (parent) { parent.appendChild(node); }
    return node;
  }
  function visible(status) {
    if (state.mode === "before") { return status !== 1; }
    if (state.mode === "after") { return status !== 2; }
    return true;
  }
  function shown(status) {  // a status drawn as plain in the before / after modes
    if (state.mode === "diff") { return status; }
    if (status === 3) { return 3; }
    return 0;
  }
  function apply() {
    state.root.setAttribute("transform", "translate(" + state.tx + "," + state.ty +
                            ") scale(" + state.scale + ")");
  }
  function fit() {
    var view = state.view, box = host.getBoundingClientRect();
    if (!view || !box.width) { return; }
    var width = Math.max(view.width, 1), height = Math.max(view.height, 1);
    state.scale = Math.min((box.width - 20) / width, (box.height - 20) / height, 1.5);
    state.tx = (box.width - width * state.scale) / 2;
    state.ty = Math.max(10, (box.height - height * state.scale) / 2);
    apply();
  }
  function centre(node, scale) {
    var box = host.getBoundingClientRect();
    state.scale = scale || Math.max(state.scale, 1);
    state.tx = box.width / 2 - node[0] * state.scale;
    state.ty = box.height / 2 - node[1] * state.scale;
    apply();
  }
  function draw(index) {
    var view = views[index];
    state.view = view;
    if (state.svg) { host.removeChild(state.svg); }
    var svg = el("svg", {"aria-label": "graph: " + view.title}, null);
    host.insertBefore(svg, tip);
    state.svg = svg;
    state.root = el("g", {}, svg);
    var edges = el("g", {}, state.root), nodes = el("g", {}, state.root);
    view.edges.forEach(function (edge) {
      if (!visible(edge[2])) { return; }
      var a = view.nodes[edge[0]], b = view.nodes[edge[1]];
      if (!visible(a[3]) || !visible(b[3])) { return; }
      var x1 = a[0], y1 = a[1] + HEIGHT / 2, x2 = b[0], y2 = b[1] - HEIGHT / 2;
      var bend = Math.max(12, (y2 - y1) / 2);
      var d = "M" + x1 + "," + y1 + " C" + x1 + "," + (y1 + bend) + " " + x2 + "," +
              (y2 - bend) + " " + x2 + "," + y2;
      el("path", {"class": "edge s" + shown(edge[2]), d: d}, edges);
    });
    state.groups = [];
    state.changes = [];
    view.nodes.forEach(function (node, i) {
      if (!visible(node[3])) { return; }
      var kind = node[6] === "op" ? "op" : (node[6] === "input" || node[6] === "output" ?
                                             node[6] : "weight");
      var group = el("g", {"class": "node s" + shown(node[3]) + " k-" + kind,
                           "data-index": i}, nodes);
      el("rect", {x: node[0] - node[2] / 2, y: node[1] - HEIGHT / 2, width: node[2],
                  height: HEIGHT}, group);
      var text = el("text", {x: node[0], y: node[1] + 4, "text-anchor": "middle"}, group);
      text.textContent = node[4];
      state.groups.push(group);
      if (node[3] !== 0 && shown(node[3]) !== 0) { state.changes.push(node); }
    });
    var c = view.counts;
    counts.textContent = view.diff ? (c.added + " added · " + c.removed + " removed · " +
                                      c.changed + " changed · " + view.nodes.length +
                                      " nodes") : view.nodes.length + " nodes";
    state.next = 0;
    fit();
  }
  function describe(node) {
    var lines = [node[5] + "  (" + STATUS[node[3]] + ")", node[10], "kind: " + node[6]];
    if (node[7]) { lines.push("shape: " + node[7]); }
    if (node[8]) { lines.push("module: " + node[8]); }
    if (node[9]) { lines.push("created by: " + node[9]); }
    return lines.join("\n");
  }

  if (!views.length) {
    document.body.dataset.ready = "1";
    return;
  }
  views.forEach(function (view, i) {
    var option = document.createElement("option");
    option.value = String(i);
    option.textContent = view.title + (view.diff ? "  (+" + view.counts.added + " −" +
                                       view.counts.removed + " ~" + view.counts.changed + ")"
                                       : "");
    select.appendChild(option);
  });
  select.addEventListener("change", function () { draw(Number(select.value)); });
  document.querySelectorAll("input[name=gp-mode]").forEach(function (radio) {
    radio.addEventListener("change", function () {
      state.mode = radio.value;
      draw(Number(select.value));
    });
  });
  document.getElementById("gp-fit").addEventListener("click", fit);
  function zoomBy(factor, x, y) {
    var box = host.getBoundingClientRect();
    if (x === undefined) { x = box.width / 2; y = box.height / 2; }
    var scale = Math.min(Math.max(state.scale * factor, 0.01), 8);
    state.tx = x - (x - state.tx) * scale / state.scale;
    state.ty = y - (y - state.ty) * scale / state.scale;
    state.scale = scale;
    apply();
  }
  document.getElementById("gp-in").addEventListener("click", function () { zoomBy(1.3); });
  document.getElementById("gp-out").addEventListener("click", function () { zoomBy(1 / 1.3); });
  document.getElementById("gp-next").addEventListener("click", function () {
    if (!state.changes.length) { return; }
    centre(state.changes[state.next % state.changes.length], 1.2);
    state.next += 1;
  });
  host.addEventListener("wheel", function (event) {
    event.preventDefault();
    var box = host.getBoundingClientRect();
    zoomBy(Math.exp(-event.deltaY * 0.0015), event.clientX - box.left, event.clientY - box.top);
  }, {passive: false});
  var drag = null;
  host.addEventListener("mousedown", function (event) {
    drag = {x: event.clientX - state.tx, y: event.clientY - state.ty};
    host.classList.add("dragging");
  });
  window.addEventListener("mouseup", function () { drag = null; host.classList.remove("dragging"); });
  window.addEventListener("mousemove", function (event) {
    if (!drag) { return; }
    state.tx = event.clientX - drag.x;
    state.ty = event.clientY - drag.y;
    apply();
  });
  host.addEventListener("mouseover", function (event) {
    var group = event.target.closest ? event.target.closest("g.node") : null;
    if (!group) { tip.hidden = true; return; }
    tip.textContent = describe(state.view.nodes[Number(group.dataset.index)]);
    tip.hidden = false;
  });
  host.addEventListener("mousemove", function (event) {
    if (tip.hidden) { return; }
    var box = host.getBoundingClientRect();
    tip.style.left = Math.min(event.clientX - box.left + 14, box.width - 300) + "px";
    tip.style.top = (event.clientY - box.top + 14) + "px";
  });
  host.addEventListener("mouseleave", function () { tip.hidden = true; });
  document.getElementById("gp-find").addEventListener("input", function (event) {
    var text = event.target.value.trim().toLowerCase(), first = null;
    state.groups.forEach(function (group) {
      var node = state.view.nodes[Number(group.dataset.index)];
      var hit = text && (node[5] + " " + node[10] + " " + node[8]).toLowerCase()
        .indexOf(text) >= 0;
      group.classList.toggle("found", Boolean(hit));
      if (hit && !first) { first = node; }
    });
    if (first) { centre(first, 1.2); }
  });
  // open on the first pass that changed the graph, if any
  var start = 0;
  for (var i = 0; i < views.length; i++) { if (views[i].diff) { start = i; break; } }
  select.value = String(start);
  draw(start);
  document.body.dataset.ready = "1";
})();
