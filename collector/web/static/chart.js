"use strict";
// A tiny chart library of our own (no CDN): SVG strings from numbers. Only numbers and esc()'d text go in.
window.PantauChart = (() => {
  // drawn at the width it is shown at (opts.width), so its text stays 10 px on a phone too
  let W = 720, PAD_L = 44;
  const PAD_R = 8, PAD_T = 8, PAD_B = 22;
  const size = (opts, pad) => { W = Math.max(300, Math.round(opts.width || 720)); PAD_L = pad; };
  const escT = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
  const num = (v) => (Number.isFinite(v) ? Math.round(v * 10) / 10 : 0);

  function frame(t0, t1, h, fmtTime, yTicks) {
    const x = (t) => PAD_L + (W - PAD_L - PAD_R) * (t - t0) / Math.max(1, t1 - t0);
    let s = `<line class="axis" x1="${PAD_L}" y1="${h - PAD_B}" x2="${W - PAD_R}" y2="${h - PAD_B}"/>`;
    const n = W < 560 ? 2 : 4;
    for (let i = 0; i <= n; i++) {
      const t = t0 + (t1 - t0) * i / n;
      const anchor = i === 0 ? "start" : i === n ? "end" : "middle";
      s += `<text class="tick" x="${num(x(t))}" y="${h - 6}" text-anchor="${anchor}">${escT(fmtTime(t))}</text>`;
    }
    for (const [y, label] of yTicks) {
      s += `<line class="grid" x1="${PAD_L}" y1="${num(y)}" x2="${W - PAD_R}" y2="${num(y)}"/>`;
      s += `<text class="tick" x="${PAD_L - 4}" y="${num(y) + 4}" text-anchor="end">${escT(label)}</text>`;
    }
    return [x, s];
  }

  // series: [{name, cls, points: [[t, v], ...]}]; gaps longer than 2.5 steps break the line
  function lines(series, t0, t1, opts) {
    size(opts, 44);
    const h = opts.height || 160, step = Math.max(1, opts.step || 30), top = opts.max ?? Math.max(1, ...series.flatMap((s) => s.points.map((p) => p[1] || 0)));
    const y = (v) => PAD_T + (h - PAD_T - PAD_B) * (1 - Math.min(1, Math.max(0, v / top)));
    const ticks = [[y(0), "0"], [y(top / 2), opts.fmt ? opts.fmt(top / 2) : num(top / 2)], [y(top), opts.fmt ? opts.fmt(top) : num(top)]];
    const [x, s0] = frame(t0, t1, h, opts.fmtTime, ticks);
    let s = s0;
    for (const ser of series) {
      let d = "", prev = null;
      for (const [t, v] of ser.points) {
        if (v === null || v === undefined) { prev = null; continue; }
        d += `${prev === null || t - prev > 2.5 * step ? "M" : "L"}${num(x(t))},${num(y(v))} `;
        prev = t;
      }
      if (d) s += `<path class="line ${escT(ser.cls)}" d="${d.trim()}"/>`;
    }
    return svg(s, h, opts.title, series);
  }

  function bars(points, t0, t1, opts) {
    size(opts, 44);
    const h = opts.height || 110, step = Math.max(1, opts.step || 300), top = Math.max(1, ...points.map((p) => p[1]));
    const y = (v) => PAD_T + (h - PAD_T - PAD_B) * (1 - v / top);
    const [x, s0] = frame(t0, t1, h, opts.fmtTime, [[y(0), "0"], [y(top), num(top)]]);
    let s = s0;
    const bw = Math.max(1, x(t0 + step) - x(t0) - 1);
    for (const [t, v] of points) {
      if (!v) continue;
      s += `<rect class="bar ${escT(opts.cls || "")}" x="${num(x(t))}" y="${num(y(v))}" width="${num(bw)}" height="${num(y(0) - y(v))}"><title>${escT(opts.fmtTime(t))}: ${num(v)}</title></rect>`;
    }
    return svg(s, h, opts.title, []);
  }

  // rows: [{label, cls, points: [[t, fraction 0..1], ...]}]; bands: [{t0, t1, cls, title}]
  function strip(rows, bands, t0, t1, opts) {
    size(opts, 84);
    const rowH = 16, h = PAD_T + rows.length * (rowH + 4) + PAD_B;
    const [x, s0] = frame(t0, t1, h, opts.fmtTime, []);
    let s = s0;
    const step = Math.max(1, opts.step || 300);
    for (const b of bands) {
      const a = Math.max(t0, b.t0), e = Math.min(t1, b.t1);
      if (e <= a) continue;
      s += `<rect class="band ${escT(b.cls)}" x="${num(x(a))}" y="${PAD_T}" width="${num(Math.max(1, x(e) - x(a)))}" height="${h - PAD_T - PAD_B}"><title>${escT(b.title)}</title></rect>`;
    }
    rows.forEach((r, i) => {
      const top = PAD_T + i * (rowH + 4);
      s += `<text class="tick" x="${PAD_L - 4}" y="${top + 12}" text-anchor="end">${escT(r.label)}</text>`;
      const bw = Math.max(1, x(t0 + step) - x(t0));
      for (const [t, v] of r.points) {
        if (!v) continue;
        s += `<rect class="cell ${escT(r.cls)}" x="${num(x(t))}" y="${top}" width="${num(bw)}" height="${rowH}" opacity="${num(0.25 + 0.75 * Math.min(1, v))}"/>`;
      }
    });
    return svg(s, h, opts.title, []);
  }

  function svg(inner, h, title, series) {
    const legend = series.filter((s) => s.name).map((s) => `<span class="key ${escT(s.cls)}">${escT(s.name)}</span>`).join(" ");
    return `<figure class="chart"><figcaption>${escT(title || "")} ${legend}</figcaption>` +
      `<svg viewBox="0 0 ${W} ${h}" role="img" aria-label="${escT(title || "")}">${inner}</svg></figure>`;
  }

  return {lines, bars, strip};
})();
