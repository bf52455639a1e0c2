/* Tiny line-chart drawer for <canvas>, written for this dashboard (no library, no CDN).
 *
 * drawLineChart(canvas, series, opts): series = [{name, color, points: [[x, y], ...]}];
 * opts = {xLabel(x) -> string, yLabel(y) -> string, logY: bool}. Sets canvas.dataset.points
 * to the number of points drawn (the browser test reads it). */
(function () {
  "use strict";
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { return [lo]; }
    const raw = (hi - lo) / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-12; t += step) { ticks.push(t); }
    return ticks;
  }
  function drawLineChart(canvas, series, opts) {
    opts = opts || {};
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    canvas.width = w * ratio; canvas.height = h * ratio;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const pad = {l: 56, r: 12, t: 10, b: 26};
    const all = series.flatMap(s => s.points).filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    canvas.dataset.points = String(all.length);
    ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#667085";
    if (all.length === 0) { ctx.fillText("no data yet", w / 2 - 30, h / 2); return; }
    let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
    let y0 = Math.min(...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 + 1e-9; y1 += Math.abs(y1) * 0.1 + 1e-9; }
    const X = x => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
    const Y = y => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
    ctx.strokeStyle = "#e4e7ec"; ctx.lineWidth = 1;
    for (const t of niceTicks(y0, y1, 4)) {
      ctx.beginPath(); ctx.moveTo(pad.l, Y(t)); ctx.lineTo(w - pad.r, Y(t)); ctx.stroke();
      ctx.fillText((opts.yLabel || String)(t), 4, Y(t) + 4);
    }
    for (const t of niceTicks(x0, x1, 5)) {
      ctx.fillText((opts.xLabel || String)(t), X(t) - 10, h - 8);
    }
    for (const s of series) {
      const pts = s.points.filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
      ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2;
      ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
      ctx.stroke();
      for (const p of pts) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 2 * Math.PI); ctx.fill(); }
    }
  }
  window.drawLineChart = drawLineChart;
})();
