// The status page's charts and refresh (coordinator/status_http.py serves this file).
//
// The server renders every table; this script draws the charts with Chart.js from the JSON block
// the page carries (#status-data, the snapshot of coordinator/status_data.py), and every
// data-refresh-s seconds fetches the page again, swaps in the sections marked data-refresh and
// updates the charts in place. Each drawn canvas gets data-points (the points it shows) and
// data-rendered, which the browser test reads.
"use strict";

(function () {
  const charts = new Map(); // canvas id -> Chart
  const CURVES = [
    { field: "loss", y: "loss" },
    { field: "samples_per_s", y: "samples/s" },
    { field: "peers", y: "peers", stepped: true },
  ];

  function readData(doc) {
    const el = doc.getElementById("status-data");
    return el ? JSON.parse(el.textContent) : null;
  }

  // Marks a canvas once Chart.js has drawn it, with the number of points it holds.
  const markRendered = {
    id: "coldswarmMark",
    afterRender(chart) {
      let n = 0;
      for (const ds of chart.data.datasets) {
        if (ds.isEdge) continue;
        for (const p of ds.data) if (p && p.y !== null && p.y !== undefined && Number.isFinite(p.y)) n++;
      }
      chart.canvas.dataset.points = String(n);
      chart.canvas.dataset.rendered = "1";
    },
  };

  function baseOptions(xTitle, yTitle) {
    return {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: xTitle }, grid: { color: "#eef0f4" } },
        y: { title: { display: true, text: yTitle }, grid: { color: "#eef0f4" } },
      },
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 12, boxHeight: 12 } },
      },
    };
  }

  function upsert(id, config) {
    const canvas = document.getElementById(id);
    if (!canvas) return;
    const old = charts.get(id);
    if (old && old.canvas === canvas) {
      old.data = config.data;
      old.options = config.options;
      old.update("none");
      return;
    }
    if (old) old.destroy();
    config.plugins = [markRendered];
    charts.set(id, new Chart(canvas, config));
  }

  // -- a pretrain round's curves over time ------------------------------------------------------

  function drawCurves(data) {
    const series = data.series;
    if (!series) return;
    // Minutes, unless the whole curve is shorter than two of them.
    const span = Math.max(0, ...Object.values(series.sources).flatMap((v) => v.t));
    const unit = span < 120 ? 1 : 60;
    const xTitle = `${unit === 1 ? "seconds" : "minutes"} since round ${series.round} opened`;
    for (const curve of CURVES) {
      const datasets = [];
      for (const [source, values] of Object.entries(series.sources)) {
        const look = data.series_sources[source] || { label: source, color: "#666" };
        const points = values.t.map((t, i) => ({ x: t / unit, y: values[curve.field][i] }));
        if (!points.some((p) => p.y !== null)) continue;
        datasets.push({
          label: look.label,
          data: points,
          borderColor: look.color,
          backgroundColor: look.color,
          borderWidth: 2,
          pointRadius: points.length > 60 ? 0 : 2.5,
          tension: curve.stepped ? 0 : 0.3,
          cubicInterpolationMode: "monotone", // smooth, never past the points it joins
          stepped: curve.stepped ? "before" : false,
          spanGaps: true,
        });
      }
      const options = baseOptions(xTitle, curve.y);
      options.scales.y.beginAtZero = curve.field !== "loss";
      if (curve.field === "peers") options.scales.y.ticks = { precision: 0 };
      upsert(`curve-${curve.field}`, { type: "line", data: { datasets }, options });
    }
  }

  // -- the lineage: metrics per version, each point joined to its parent ------------------------

  function styleOf(data, point) {
    const styles = data.state_styles;
    const s = styles[point.state] || styles.other;
    return point.current ? { ...s, chartjs: styles.current.chartjs } : s;
  }

  function lineageConfig(data, chart) {
    const datasets = [];
    for (const line of chart.lines) {
      const edges = [];
      for (const [[px, py], [x, y]] of line.edges) edges.push({ x: px, y: py }, { x, y }, { x, y: null });
      datasets.push({
        label: line.metric,
        isEdge: true,
        data: edges,
        showLine: true,
        spanGaps: false,
        borderColor: line.color + "99",
        borderWidth: 1.5,
        pointRadius: 0,
        pointHitRadius: 0,
      });
      const points = line.points.map((p) => ({ ...p }));
      datasets.push({
        label: line.metric,
        data: points,
        borderColor: line.color,
        backgroundColor: line.color,
        pointStyle: points.map((p) => styleOf(data, p).chartjs),
        pointRadius: points.map((p) => (p.current ? 10 : 5.5)),
        pointHoverRadius: points.map((p) => (p.current ? 12 : 7.5)),
        pointBorderWidth: points.map((p) => (styleOf(data, p).filled === false ? 2 : 1.5)),
        pointBackgroundColor: points.map((p) => (styleOf(data, p).filled === false ? "#ffffff" : line.color)),
        pointBorderColor: line.color,
      });
    }
    const options = baseOptions("version", chart.y_label);
    options.scales.x.ticks = { stepSize: 1, precision: 0 };
    options.plugins.legend.labels.filter = (item, d) => !d.datasets[item.datasetIndex].isEdge;
    options.plugins.legend.display = chart.lines.length > 1;
    options.plugins.tooltip = {
      filter: (item) => !item.dataset.isEdge,
      callbacks: {
        title: (items) => (items.length ? `version ${items[0].raw.x}` : ""),
        label: (item) =>
          `${item.dataset.label} ${Number(item.raw.y).toPrecision(4)} (${styleOf(data, item.raw).label})`,
      },
    };
    return { type: "scatter", data: { datasets }, options };
  }

  function drawLineage(data) {
    for (const chart of data.lineage_charts) {
      if (!chart.more) upsert(`lineage-${chart.id}`, lineageConfig(data, chart));
    }
    const select = document.getElementById("more-metric");
    if (select) {
      const chosen = data.lineage_charts.find((c) => c.id === select.value);
      if (chosen) upsert("lineage-more", lineageConfig(data, chosen));
    }
  }

  // -- refresh ----------------------------------------------------------------------------------

  let current = null;

  function draw(data) {
    current = data;
    drawCurves(data);
    drawLineage(data);
  }

  function canvasIds(root) {
    return Array.from(root.querySelectorAll("canvas"), (c) => c.id).join(",");
  }

  async function refresh() {
    try {
      const response = await fetch(location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" });
      if (!response.ok) return;
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const el of document.querySelectorAll("[data-refresh]")) {
        const fresh = el.id && doc.getElementById(el.id);
        if (fresh) el.replaceWith(document.importNode(fresh, true));
      }
      // A chart that appeared or went (a first curve, a new metric): take the new sections whole.
      for (const id of ["curves", "lineage"]) {
        const mine = document.getElementById(id);
        const fresh = doc.getElementById(id);
        if (mine && fresh && canvasIds(mine) !== canvasIds(fresh)) {
          const keep = document.getElementById("more-metric");
          const chosen = keep ? keep.value : null;
          mine.replaceWith(document.importNode(fresh, true));
          const select = document.getElementById("more-metric");
          if (select && chosen && Array.from(select.options).some((o) => o.value === chosen)) select.value = chosen;
          bindSelect();
        }
      }
      const data = readData(doc);
      if (data) draw(data);
    } catch (err) {
      console.warn("status refresh failed", err);
    }
  }

  function bindSelect() {
    const select = document.getElementById("more-metric");
    if (select && !select.dataset.bound) {
      select.dataset.bound = "1";
      select.addEventListener("change", () => current && drawLineage(current));
    }
  }

  function start() {
    if (typeof Chart === "undefined") {
      document.body.classList.add("no-charts");
      return;
    }
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.color = "#3b4252";
    bindSelect();
    const data = readData(document);
    if (data) draw(data);
    const every = Number(document.body.dataset.refreshS || 10) * 1000;
    setInterval(refresh, every);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
