// slmops dashboard: times in the viewer's zone, confirmations for actions, and uPlot charts.
(function () {
  "use strict";
  const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const at = new Date(el.getAttribute("datetime"));
      if (!isNaN(at)) { el.textContent = timeFormat.format(at); el.title = el.getAttribute("datetime"); }
    });
  }

  document.addEventListener("submit", (event) => {
    const question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });

  const palette = ["#0969da", "#cf222e", "#2da44e", "#8250df", "#bf8700"];
  const plots = new Map();  // every chart drawn → its figure: fitted to the figure's width when the window changes

  function fitted(figure) { return Math.max(260, figure.clientWidth || 340); }

  function drawn(figure, plot, points) {
    plot.root.setAttribute("data-points", String(points));
    plots.forEach((other, old) => {  // charts htmx swapped out: uPlot's window listeners would keep them
      if (!other.isConnected) { old.destroy(); plots.delete(old); }
    });
    plots.set(plot, figure);
  }

  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => plots.forEach((figure, plot) => plot.setSize({ width: fitted(figure), height: plot.height })), 150);
  });

  function drawSeries(figure, data) {
    const names = figure.dataset.series.split(",");
    const times = [...new Set(names.flatMap((n) => (data[n] || []).map((p) => p[0])))].sort((a, b) => a - b);
    if (!times.length) {
      figure.insertAdjacentHTML("beforeend", "<p class=\"empty\">No figures reported yet.</p>");
      return;
    }
    const columns = [times].concat(names.map((n) => {
      const at = new Map((data[n] || []).map((p) => [p[0], p[1]]));
      return times.map((t) => (at.has(t) ? at.get(t) : null));
    }));
    const series = [{}].concat(names.map((n, i) => ({ label: n.split(".")[1], stroke: palette[i % palette.length], width: 2, spanGaps: true })));
    const plot = new uPlot({ width: fitted(figure), height: 180, series: series, axes: [{}, { size: 60 }] }, columns, figure);
    drawn(figure, plot, times.length);
  }

  function drawGates(figure) {
    // one gate: each judged device a point beside the others of its wave, its figure (held or broke) and
    // its own bound; no line between them, each bound being that device's
    const points = JSON.parse(figure.dataset.gates);
    if (!points.length) return;
    const perWave = new Map();
    points.forEach((p) => perWave.set(p.wave, (perWave.get(p.wave) || 0) + 1));
    const seen = new Map();
    const x = points.map((p) => {
      const i = seen.get(p.wave) || 0;
      seen.set(p.wave, i + 1);
      return p.wave - 0.4 + (0.8 * (i + 0.5)) / perWave.get(p.wave);
    });
    const waves = [...perWave.keys()];
    const dot = (colour) => ({ show: true, size: 8, fill: colour, stroke: colour });
    const series = [{ label: "device", value: (u, v, s, i) => (i == null ? "" : `wave ${points[i].wave} ${points[i].device}`) },
                    { label: "held", stroke: "#1a7f37", width: 0, points: dot("#1a7f37") },
                    { label: "broke", stroke: "#cf222e", width: 0, points: dot("#cf222e") },
                    { label: "bound", stroke: "#57606a", width: 0, points: { show: true, size: 12, width: 2, fill: "transparent" } }];
    const axes = [{ incrs: [1], values: (u, splits) => splits.map((w) => (Number.isInteger(w) ? `wave ${w}` : "")) },
                  { size: 60 }];
    const scales = { x: { time: false, range: [Math.min(...waves) - 0.5, Math.max(...waves) + 0.5] } };
    const columns = [x, points.map((p) => (p.held ? p.value : null)), points.map((p) => (p.held ? null : p.value)),
                     points.map((p) => p.limit)];
    const plot = new uPlot({ width: fitted(figure), height: 200, series: series, axes: axes, scales: scales },
                           columns, figure);
    drawn(figure, plot, points.length);
  }

  function charts(root) {
    const bySource = new Map();
    root.querySelectorAll("figure.chart[data-src]").forEach((figure) => {
      if (figure.querySelector(".uplot")) return;
      const src = figure.dataset.src;
      if (!bySource.has(src)) bySource.set(src, fetch(src, { credentials: "same-origin" }).then((r) => r.json()));
      bySource.get(src).then((data) => drawSeries(figure, data));
    });
    root.querySelectorAll("figure.chart[data-gates]").forEach((figure) => {
      if (!figure.querySelector(".uplot")) drawGates(figure);
    });
  }

  function refresh(root) { localTimes(root); charts(root); }
  document.addEventListener("DOMContentLoaded", () => refresh(document));
  document.addEventListener("htmx:afterSwap", (event) => refresh(event.target));
})();
