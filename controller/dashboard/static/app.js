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
    const width = Math.max(260, figure.clientWidth || 340);
    const plot = new uPlot({ width: width, height: 180, series: series, axes: [{}, { size: 60 }] }, columns, figure);
    plot.root.setAttribute("data-points", String(times.length));
  }

  function drawGates(figure) {
    const points = JSON.parse(figure.dataset.gates).filter((p) => p.value !== null && p.limit !== null);
    if (!points.length) return;
    const x = points.map((_, i) => i + 1);
    const series = [{}, { label: "figure", stroke: "#cf222e", width: 0, points: { show: true, size: 8 } },
                    { label: "bound", stroke: "#57606a", width: 2, dash: [6, 4] }];
    const width = Math.max(260, figure.clientWidth || 340);
    const axes = [{ incrs: [1], values: (u, splits) => splits.map((i) => (points[i - 1] ? points[i - 1].device : "")) },
                  { size: 60 }];
    const plot = new uPlot({ width: width, height: 180, series: series, axes: axes, scales: { x: { time: false } } },
                           [x, points.map((p) => p.value), points.map((p) => p.limit)], figure);
    plot.root.setAttribute("data-points", String(points.length));
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
