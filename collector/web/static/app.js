"use strict";
// The dashboard: overview (#/), room (#/room/AGENT), device (#/device/KEY?agent=), incident (#/incident/ID),
// reports (#/reports). Every string from agents, USB descriptors, the registry or people goes through esc().
const T = window.PANTAU_T;
const Chart = window.PantauChart;
let lang = localStorage.getItem("pantau.lang") || "id";
let tz = localStorage.getItem("pantau.tz") || "WIB";
const ZONES = {WIB: 7, WITA: 8, WIT: 9, UTC: 0};
const t = (k) => (T[lang][k] ?? T.en[k] ?? k);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const $ = (id) => document.getElementById(id);
const view = $("view");
let me = null, meta = null, route = {name: "", args: []}, renderSeq = 0;
const can = (p) => Boolean(me && me.user.permissions.includes(p));
const ui = {tab: localStorage.getItem("pantau.tab") === "incidents" ? "incidents" : "rooms",
            rooms: {q: "", status: "", kind: "", sort: "problems", order: "desc", offset: 0, limit: 10},
            inc: {q: "", status: "open", cause: "", kind: "", model: "", since: "", until: "", sort: "opened_at",
                  order: "desc", offset: 0, limit: 15}, range: "day", unit: ""};

// ---------------------------------------------------------------- names and times
const causeName = (c) => (meta && meta.causes[lang][c]) || c || "";
const respName = (r) => (meta && meta.responsible[lang][r]) || r || "";
const incKindName = (k) => (meta && meta.incident_kinds[lang][k]) || k || "";
const kindName = (k) => (meta && (meta.device_kinds[lang][k] || meta.device_kinds[lang].other)) || k || "";
const actionName = (a) => t(a === "opened" ? "opened_e" : a);
function toMs(v) { return typeof v === "number" ? v * 1000 : Date.parse(v); }
function fmt(v, withSec) {
  if (v === null || v === undefined || v === "") return "";
  const ms = toMs(v);
  if (!Number.isFinite(ms)) return String(v);
  const s = new Date(ms + ZONES[tz] * 3600e3).toISOString();
  return `${s.slice(0, 10)} ${s.slice(11, withSec ? 19 : 16)} ${tz}`;
}
const fmtShort = (sec) => { const s = new Date(sec * 1000 + ZONES[tz] * 3600e3).toISOString(); return `${s.slice(5, 10)} ${s.slice(11, 16)}`; };
function localDateToUtc(d, endOfDay) {  // a date typed in the reader's zone -> RFC 3339 UTC
  if (!d) return "";
  const ms = Date.parse(d + "T00:00:00Z") - ZONES[tz] * 3600e3 + (endOfDay ? 86400e3 : 0);
  return new Date(ms).toISOString();
}
function dur(s) {
  s = Math.round(s || 0);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} ${lang === "id" ? "jam" : "h"}`;
  return `${Math.round(s / 86400)} ${lang === "id" ? "hari" : "d"}`;
}
const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(2)} %`);

// ---------------------------------------------------------------- talking to the collector
async function api(url, opts = {}) {
  const r = await fetch(url, {credentials: "same-origin", ...opts});
  if (r.status === 401) { location.replace("/login"); throw new Error("signed out"); }
  return r;
}
async function getJSON(url) {
  const r = await api(url);
  if (!r.ok) { const e = new Error(r.status === 404 ? t("not_found") : `${t("failed")} (${r.status})`); e.status = r.status; throw e; }
  return [await r.json(), Number(r.headers.get("X-Total-Count") || 0)];
}
async function post(url, body) {
  const r = await api(url, {method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRF-Token": me.csrf || ""}});
  let j = {};
  try { j = await r.json(); } catch (e) { j = {error: String(r.status)}; }
  if (!r.ok && r.status === 403) j.error = `${t("forbidden")} (${j.error || r.status})`;
  return [r, j];
}
function qs(o) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(o)) if (v !== "" && v !== null && v !== undefined) p.set(k, v);
  return p.toString();
}
const unitParam = () => (me.user.unit ? "" : ui.unit);

// ---------------------------------------------------------------- small pieces of markup
const td = (label, html, cls) => `<td data-label="${esc(label)}"${cls ? ` class="${esc(cls)}"` : ""}>${html}</td>`;
const badge = (status) => `<span class="badge s-${esc(status)}">${esc(t(status))}</span>`;
function deviceChip(d, agent) {
  const name = d.product || d.key;
  const extra = d.status === "missing" && d.pulled_in_use ? ` · ${esc(t("pulled_in_use"))}` : "";
  return `<a class="dev s-${esc(d.status)}" data-key="${esc(d.key)}" data-status="${esc(d.status)}" ` +
    `href="#/device/${encodeURIComponent(d.key)}?agent=${encodeURIComponent(agent || "")}" title="${esc(d.key)}">` +
    `${esc(kindName(d.kind))}: ${esc(name)} <b>${esc(t(d.status))}${extra}</b></a>`;
}
function clockFlag(a) {
  if (a.clock_offset_s === null || a.clock_offset_s === undefined) return "";
  const off = Math.round(a.clock_offset_s);
  return a.clock_suspect ? `<span class="clock-off" title="${esc(a.clock)}">⚠ ${esc(t("clock_off"))} ${esc(dur(Math.abs(off)))}</span>`
                         : `<span class="clock-ok">${esc(t("clock_ok"))} (${esc(off)} s)</span>`;
}
function stateCell(a) {
  if (a.state === "never") return `<span class="offline">${esc(t("never"))}</span>`;
  const word = `<span class="${a.online ? "online" : "offline"}">${esc(t(a.online ? "online" : "offline"))}</span>`;
  return a.offline_long ? `${word} <span class="flag">⚠ ${esc(t("offline_long"))} ${esc(dur(a.offline_working_s))} (${esc(t("working_hours"))})</span>` : word;
}
function pager(id, total, st) {
  const from = total ? st.offset + 1 : 0, to = Math.min(total, st.offset + st.limit);
  return `<div class="pager" id="${id}-pager"><button type="button" data-dir="-1" ${st.offset <= 0 ? "disabled" : ""}>${esc(t("prev"))}</button>` +
    `<span>${from}–${to} ${esc(t("of"))} ${total}</span>` +
    `<button type="button" data-dir="1" ${to >= total ? "disabled" : ""}>${esc(t("next"))}</button></div>`;
}
// On a wide screen the overview fits the window: a table scrolls inside its box, its pager stays in view.
function fitTables() {
  const wide = matchMedia("(min-width: 701px)").matches;
  document.querySelectorAll("#view .fit").forEach((box) => {
    if (!wide || box.offsetParent === null) { box.style.maxHeight = ""; return; }
    const below = box.nextElementSibling ? box.nextElementSibling.getBoundingClientRect().height : 0;
    const room = window.innerHeight - (box.getBoundingClientRect().top + window.scrollY) - below - 40;
    box.style.maxHeight = `${Math.max(180, Math.floor(room))}px`;
  });
}
function sortHead(st, key, label) {
  const mark = st.sort === key ? (st.order === "asc" ? " ▲" : " ▼") : "";
  return `<th><button type="button" class="sort" data-sort="${esc(key)}">${esc(label)}${mark}</button></th>`;
}
function options(values, current, allLabel) {
  return `<option value="">${esc(allLabel)}</option>` + values.map(([v, l]) => `<option value="${esc(v)}"${v === current ? " selected" : ""}>${esc(l)}</option>`).join("");
}

// ---------------------------------------------------------------- overview
async function renderOverview() {
  const mine = ++renderSeq;
  if (!$("ov")) {
    view.innerHTML = `<section id="ov"><div id="counts" class="counts">${esc(t("loading"))}</div>
      <div class="tabs" role="tablist"><button type="button" role="tab" id="tab-rooms" data-tab="rooms">${esc(t("rooms"))} <span></span></button>
        <button type="button" role="tab" id="tab-incidents" data-tab="incidents">${esc(t("incidents"))} <span></span></button></div>
      <section id="sec-rooms" ${ui.tab === "rooms" ? "" : "hidden"}>
      <div class="filters" id="rooms-filters">
        <input id="rooms-q" type="search" placeholder="${esc(t("search"))}" value="${esc(ui.rooms.q)}">
        <select id="rooms-status">${options(["missing", "error", "in_use", "offline", "offline_long", "clock", "ok"].map((s) => [s, t(s === "clock" ? "clocks_off" : s)]), ui.rooms.status, t("all_status"))}</select>
        <select id="rooms-kind">${options(["camera", "speakerphone", "speaker", "microphone"].map((k) => [k, kindName(k)]), ui.rooms.kind, t("all_kinds"))}</select>
      </div>
      <div id="rooms-box"></div></section>
      <section id="sec-incidents" ${ui.tab === "incidents" ? "" : "hidden"}>
      <div class="filters" id="inc-filters">
        <input id="inc-q" type="search" placeholder="${esc(t("search_inc"))}" value="${esc(ui.inc.q)}">
        <select id="inc-status">${options(["open", "resolved", "withdrawn", "all"].map((s) => [s, t(s === "all" ? "all" : s)]), ui.inc.status, t("all_status"))}</select>
        <select id="inc-cause">${options(Object.keys(meta.causes[lang]).map((c) => [c, causeName(c)]), ui.inc.cause, t("all_causes"))}</select>
        <select id="inc-kind">${options(Object.keys(meta.incident_kinds[lang]).map((k) => [k, incKindName(k)]), ui.inc.kind, t("all_kinds"))}</select>
        <input id="inc-model" placeholder="${esc(t("model"))}" value="${esc(ui.inc.model)}" maxlength="9" size="10">
        <label>${esc(t("from"))} <input id="inc-since" type="date" value="${esc(ui.inc.since)}"></label>
        <label>${esc(t("to"))} <input id="inc-until" type="date" value="${esc(ui.inc.until)}"></label>
      </div>
      <div id="inc-box"></div></section></section>`;
    wireOverview();
  }
  await Promise.all([loadCounts(mine), loadRooms(mine), loadIncidents(mine)]);
}

function showTab(tab) {
  ui.tab = tab;
  localStorage.setItem("pantau.tab", tab);
  $("sec-rooms").hidden = tab !== "rooms";
  $("sec-incidents").hidden = tab !== "incidents";
  document.querySelectorAll(".tabs button").forEach((b) => b.classList.toggle("on", b.dataset.tab === tab));
  fitTables();
}

function wireOverview() {
  showTab(ui.tab);
  document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  let timer = null;
  const later = (fn) => { clearTimeout(timer); timer = setTimeout(fn, 250); };
  $("rooms-q").addEventListener("input", (e) => { ui.rooms.q = e.target.value; ui.rooms.offset = 0; later(() => loadRooms(renderSeq)); });
  $("rooms-status").addEventListener("change", (e) => { ui.rooms.status = e.target.value; ui.rooms.offset = 0; loadRooms(renderSeq); });
  $("rooms-kind").addEventListener("change", (e) => { ui.rooms.kind = e.target.value; ui.rooms.offset = 0; loadRooms(renderSeq); });
  $("inc-q").addEventListener("input", (e) => { ui.inc.q = e.target.value; ui.inc.offset = 0; later(() => loadIncidents(renderSeq)); });
  $("inc-model").addEventListener("input", (e) => { ui.inc.model = e.target.value.trim(); ui.inc.offset = 0; later(() => loadIncidents(renderSeq)); });
  for (const k of ["status", "cause", "kind", "since", "until"]) {
    $(`inc-${k}`).addEventListener("change", (e) => { ui.inc[k] = e.target.value; ui.inc.offset = 0; loadIncidents(renderSeq); });
  }
  for (const [box, st, load] of [["rooms-box", ui.rooms, loadRooms], ["inc-box", ui.inc, loadIncidents]]) {
    $(box).addEventListener("click", (e) => {
      const s = e.target.closest("button.sort"), p = e.target.closest(".pager button");
      if (s) { st.order = st.sort === s.dataset.sort && st.order === "desc" ? "asc" : "desc"; st.sort = s.dataset.sort; st.offset = 0; load(renderSeq); }
      if (p) { st.offset = Math.max(0, st.offset + Number(p.dataset.dir) * st.limit); load(renderSeq); }
    });
  }
}

async function loadCounts(mine) {
  const [o] = await getJSON("/api/overview?" + qs({unit: unitParam()}));
  if (mine !== renderSeq || !$("counts")) return;
  const f = o.fleet, inc = o.incidents;
  const card = (label, value, cls, hint) => `<div class="count ${cls || ""}"><b>${esc(value)}</b><span>${esc(label)}</span>${hint ? `<small>${esc(hint)}</small>` : ""}</div>`;
  const list = (obj, name) => Object.entries(obj).sort((a, b) => b[1] - a[1]).map(([k, n]) => `<li><b>${esc(n)}</b> ${esc(name(k))}</li>`).join("") || `<li>${esc(t("none_yet"))}</li>`;
  $("counts").innerHTML = `<div class="row">
      ${card(t("rooms_total"), f.rooms, "", `${f.online} ${t("online")}`)}
      ${card(t("present"), f.present, "s-present")}${card(t("in_use"), f.in_use, "s-in_use")}
      ${card(t("missing"), f.missing, f.missing ? "s-missing" : "", f.pulled_in_use ? `${f.pulled_in_use} ${t("pulled_in_use")}` : "")}
      ${card(t("error"), f.error, f.error ? "s-error" : "")}
      ${card(t("agents_offline"), f.offline_long, f.offline_long ? "s-error" : "", `${f.offline} ${t("offline")}`)}
      ${card(t("clocks_off"), f.clock_suspect, f.clock_suspect ? "s-missing" : "")}
    </div><div class="row">
      ${card(t("open_incidents"), inc.open, inc.open ? "s-missing" : "")}
      <div class="count list"><span>${esc(t("by_cause"))}</span><ul id="by-cause">${list(inc.by_cause, causeName)}</ul></div>
      <div class="count list"><span>${esc(t("by_responsible"))}</span><ul id="by-resp">${list(inc.by_responsible, respName)}</ul></div>
    </div>`;
  fitTables();
}

async function loadRooms(mine) {
  const st = ui.rooms;
  const [rows, total] = await getJSON("/api/fleet?" + qs({unit: unitParam(), q: st.q, status: st.status, kind: st.kind, sort: st.sort, order: st.order, limit: st.limit, offset: st.offset}));
  if (mine !== renderSeq || !$("rooms-box")) return;
  $("tab-rooms").querySelector("span").textContent = `(${total})`;
  const report = can("handling");
  $("rooms-box").innerHTML = `<div class="fit"><table id="rooms" class="cards"><thead><tr>${sortHead(st, "room", t("room"))}${sortHead(st, "unit", t("unit"))}
      <th>${esc(t("pic"))}</th>${sortHead(st, "state", t("state"))}${sortHead(st, "problems", t("devices"))}${sortHead(st, "last_seen", t("last_seen"))}<th>${esc(t("clock"))}</th></tr></thead><tbody>` +
    (rows.map((a) => `<tr data-agent="${esc(a.agent)}">
      ${td(t("room"), `<a href="#/room/${encodeURIComponent(a.agent || a.room)}">${esc(a.room_name || a.room || a.agent)}</a><br><small>${esc(a.agent)}</small>`)}
      ${td(t("unit"), esc(a.unit_name || a.unit || t("unregistered")))}${td(t("pic"), esc(a.pic ? a.pic.name : ""))}
      ${td(t("state"), stateCell(a))}
      ${td(t("devices"), a.devices.map((d) => deviceChip(d, a.agent) + (report && a.agent && d.status !== "missing" ? ` <button type="button" class="report small" data-agent="${esc(a.agent)}" data-device="${esc(d.key)}">${esc(t("report_handling"))}</button>` : "")).join(" ") || esc(t("none_yet")))}
      ${td(t("last_seen"), esc(fmt(a.heard_at)))}${td(t("clock"), clockFlag(a))}</tr>`).join("") ||
      `<tr><td colspan="7">${esc(t("none_yet"))}</td></tr>`) + `</tbody></table></div>${pager("rooms", total, st)}`;
  fitTables();
}

function incidentRows(rows) {
  return rows.map((i) => `<tr data-id="${esc(i.id)}">
    ${td(t("opened"), `<a href="#/incident/${encodeURIComponent(i.id)}">${esc(fmt(i.opened_at))}</a>`)}
    ${td(t("device"), `${esc(i.device)}<br><small>${esc(i.room_name || i.agent)}</small>`)}
    ${td(t("kind"), esc(incKindName(i.kind)))}
    ${td(t("cause"), `${esc(causeName(i.effective_cause))}${i.decided_cause ? " ✎" : ""} <small>${esc(i.rule)}</small>`, `cause-${i.effective_cause}`)}
    ${td(t("responsible"), esc(respName(i.effective_responsible)))}
    ${td(t("unit"), esc(i.unit_name || i.unit || t("unregistered")))}${td(t("pic"), esc(i.pic_name || ""))}
    ${td(t("status"), `${esc(t(i.status))}${i.acknowledged_at ? " ✓" : ""}`)}</tr>`).join("");
}

async function loadIncidents(mine) {
  const st = ui.inc;
  const [rows, total] = await getJSON("/api/incidents?" + qs({unit: unitParam(), q: st.q, status: st.status, cause: st.cause, kind: st.kind, model: st.model,
    since: localDateToUtc(st.since, false), until: localDateToUtc(st.until, true), sort: st.sort, order: st.order, limit: st.limit, offset: st.offset}));
  if (mine !== renderSeq || !$("inc-box")) return;
  $("tab-incidents").querySelector("span").textContent = `(${total})`;
  $("inc-box").innerHTML = `<div class="fit"><table id="incidents" class="cards"><thead><tr>${sortHead(st, "opened_at", t("opened"))}${sortHead(st, "device", t("device"))}
      ${sortHead(st, "kind", t("kind"))}${sortHead(st, "cause", t("cause"))}${sortHead(st, "responsible", t("responsible"))}${sortHead(st, "unit", t("unit"))}
      <th>${esc(t("pic"))}</th>${sortHead(st, "status", t("status"))}</tr></thead><tbody>` +
    (incidentRows(rows) || `<tr><td colspan="8">${esc(t("none_yet"))}</td></tr>`) + `</tbody></table></div>${pager("inc", total, st)}`;
  fitTables();
}

// ---------------------------------------------------------------- room
const RANGES = {day: 86400, week: 7 * 86400, month: 30 * 86400};
function rangeButtons(extra) {
  const keys = ["day", "week", "month", ...(extra ? ["lease_period"] : [])];
  return `<div class="ranges">${keys.map((k) => `<button type="button" data-range="${k}" class="${ui.range === k ? "on" : ""}">${esc(t(k))}</button>`).join("")}</div>`;
}

async function renderRoom(agent) {
  const mine = ++renderSeq;
  const [a] = await getJSON("/api/fleet/" + encodeURIComponent(agent));
  if (mine !== renderSeq) return;
  const report = can("handling");
  const lease = (d) => (d.lease_start || d.lease_end ? `${esc(d.lease_start || "…")} – ${esc(d.lease_end || "…")}` : "");
  view.innerHTML = `<p><a href="#/">← ${esc(t("overview"))}</a></p>
    <h2 id="room-title">${esc(a.room_name || a.room || a.agent)} <small>${esc(a.unit_name || a.unit || "")}</small></h2>
    <dl class="facts"><dt>${esc(t("room_pc"))}</dt><dd>${esc(a.agent)} ${a.hostname ? `(${esc(a.hostname)})` : ""}</dd>
      <dt>${esc(t("state"))}</dt><dd>${stateCell(a)}</dd><dt>${esc(t("last_seen"))}</dt><dd>${esc(fmt(a.heard_at, true))}</dd>
      <dt>${esc(t("clock"))}</dt><dd>${clockFlag(a)}</dd><dt>${esc(t("pic"))}</dt><dd>${a.pic ? `${esc(a.pic.name)} ${esc(a.pic.email || "")} ${esc(a.pic.phone || "")}` : ""}</dd>
      <dt>${esc(t("version"))}</dt><dd>${esc(a.version || "")}</dd></dl>
    <h3>${esc(t("devices"))}</h3>
    <div class="device-cards">${a.devices.map((d) => `<article class="device s-${esc(d.status)}" data-key="${esc(d.key)}" data-status="${esc(d.status)}">
        <h4>${esc(kindName(d.kind))}: ${esc(d.product || d.key)}</h4>
        <p>${badge(d.status)}${d.status === "missing" && d.pulled_in_use ? ` <b class="flag">${esc(t("pulled_in_use"))}</b>` : ""}
           ${d.missing_since ? `<small>${esc(t("since"))} ${esc(fmt(d.missing_since, true))}</small>` : ""}${d.never_seen ? ` <small>${esc(t("never_seen"))}</small>` : ""}</p>
        <dl><dt>${esc(t("vendor"))}</dt><dd>${esc(d.vendor || "")}</dd><dt>${esc(t("serial"))}</dt><dd>${esc(d.serial || "")}</dd>
          <dt>${esc(t("firmware"))}</dt><dd>${esc(d.firmware || "")}</dd><dt>${esc(t("port"))}</dt><dd>${esc(d.port || "")} ${esc(d.speed || "")}</dd>
          <dt>${esc(t("lease"))}</dt><dd>${lease(d) || esc(d.registered ? t("registered") : t("unregistered"))}</dd></dl>
        <p><a href="#/device/${encodeURIComponent(d.key)}?agent=${encodeURIComponent(a.agent)}">${esc(t("history"))}</a>
          ${report && a.state !== "never" ? ` <button type="button" class="report" data-agent="${esc(a.agent)}" data-device="${esc(d.key)}">${esc(t("report_handling"))}</button>` : ""}</p>
      </article>`).join("") || esc(t("none_yet"))}</div>
    <h3>${esc(t("incidents"))}</h3>
    <table id="incidents" class="cards"><thead><tr><th>${esc(t("opened"))}</th><th>${esc(t("device"))}</th><th>${esc(t("kind"))}</th><th>${esc(t("cause"))}</th>
      <th>${esc(t("responsible"))}</th><th>${esc(t("unit"))}</th><th>${esc(t("pic"))}</th><th>${esc(t("status"))}</th></tr></thead>
      <tbody>${incidentRows(a.incidents) || `<tr><td colspan="8">${esc(t("none_yet"))}</td></tr>`}</tbody></table>
    <h3>${esc(t("history"))}</h3>${rangeButtons(false)}<div id="host-chart"></div>`;
  wireRanges(() => hostChart(a.agent, mine));
  if (a.state !== "never") hostChart(a.agent, mine);
}

function wireRanges(redraw) {
  view.querySelectorAll(".ranges button").forEach((b) => b.addEventListener("click", () => {
    ui.range = b.dataset.range;
    view.querySelectorAll(".ranges button").forEach((x) => x.classList.toggle("on", x === b));
    redraw();
  }));
}

function spanOf(range, lease) {
  const now = Date.now() / 1000;
  if (range === "lease_period" && lease && lease.lease_start) {
    const a = Date.parse(lease.lease_start + "T00:00:00Z") / 1000;
    const b = lease.lease_end ? Math.min(now, Date.parse(lease.lease_end + "T00:00:00Z") / 1000 + 86400) : now;
    if (b > a) return [a, b];
  }
  return [now - (RANGES[range] || 86400), now];
}
const iso = (s) => new Date(s * 1000).toISOString();

async function hostChart(agent, mine) {
  const [t0, t1] = spanOf(ui.range);
  const [h] = await getJSON(`/api/agents/${encodeURIComponent(agent)}/history?` + qs({from: iso(t0), to: iso(t1)}));
  if (mine !== renderSeq || !$("host-chart")) return;
  const pts = (m) => h.series[m].map((p) => [p[0], p[1]]);
  $("host-chart").innerHTML = Chart.lines([{name: "CPU %", cls: "c1", points: pts("cpu_pct")}, {name: "mem %", cls: "c2", points: pts("mem_pct")},
    {name: "disk %", cls: "c3", points: pts("disk_pct")}, {name: "°C", cls: "c4", points: pts("temp_c")}], t0, t1,
    {max: 100, step: h.step || 30, fmtTime: fmtShort, title: `${t("chart_host")} (${t("host_hint")})`, width: $("host-chart").clientWidth - 8});
}

// ---------------------------------------------------------------- device
async function renderDevice(key, agent) {
  const mine = ++renderSeq;
  const [d] = await getJSON(`/api/devices/${encodeURIComponent(key)}?` + qs({agent}));
  if (mine !== renderSeq) return;
  const info = d.info || {}, now = d.now || {}, reg = d.registry || {};
  view.innerHTML = `<p><a href="#/room/${encodeURIComponent(d.agent || "")}">← ${esc(reg.room_name || d.agent || t("overview"))}</a></p>
    <h2>${esc(kindName(info.kind))}: ${esc(info.product || key)}</h2>
    <div class="device s-${esc(now.status || "missing")}" data-key="${esc(key)}" data-status="${esc(now.status || "missing")}">${badge(now.status || "missing")}
      ${now.pulled_in_use ? `<b class="flag">${esc(t("pulled_in_use"))}</b>` : ""}</div>
    <dl class="facts"><dt>Key</dt><dd>${esc(key)}</dd><dt>${esc(t("vendor"))}</dt><dd>${esc(info.vendor || "")}</dd>
      <dt>${esc(t("serial"))}</dt><dd>${esc(info.serial || "")}</dd><dt>${esc(t("firmware"))}</dt><dd>${esc(info.firmware || "")}</dd>
      <dt>${esc(t("speed"))}</dt><dd>${esc(info.speed || "")} / ${esc(info.max_speed || "")}</dd>
      <dt>${esc(t("room"))}</dt><dd>${esc(reg.room_name || reg.room || "")} (${esc(d.agent || "")})</dd><dt>${esc(t("unit"))}</dt><dd>${esc(reg.unit_name || reg.unit || t("unregistered"))}</dd>
      <dt>${esc(t("pic"))}</dt><dd>${esc(reg.pic ? reg.pic.name : "")}</dd>
      <dt>${esc(t("lease"))}</dt><dd>${d.loan ? `${esc(d.loan.lease_start || "…")} – ${esc(d.loan.lease_end || "…")} ${esc(d.loan.condition || "")}` : esc(t("unregistered"))}</dd></dl>
    <h3>${esc(t("history"))}</h3>${rangeButtons(Boolean(d.loan && d.loan.lease_start))}<div id="dev-chart"></div>
    <h3>${esc(t("incidents"))}</h3><table id="incidents" class="cards"><thead><tr><th>${esc(t("opened"))}</th><th>${esc(t("device"))}</th><th>${esc(t("kind"))}</th>
      <th>${esc(t("cause"))}</th><th>${esc(t("responsible"))}</th><th>${esc(t("unit"))}</th><th>${esc(t("pic"))}</th><th>${esc(t("status"))}</th></tr></thead>
      <tbody>${incidentRows(d.incidents) || `<tr><td colspan="8">${esc(t("none_yet"))}</td></tr>`}</tbody></table>`;
  const draw = () => deviceChart($("dev-chart"), key, d.agent, ...spanOf(ui.range, d.loan), mine, true);
  wireRanges(draw);
  draw();
}

async function deviceChart(box, key, agent, t0, t1, mine, withEvents) {
  const [h] = await getJSON(`/api/devices/${encodeURIComponent(key)}/history?` + qs({agent, from: iso(t0), to: iso(t1)}));
  if (mine !== renderSeq || !box.isConnected) return;
  const step = h.step || 30, s = h.series;
  const frac = (m) => s[m].map((p) => [p[0], p[1]]);
  const errs = h.errors.filter((p) => p[1] > 0);
  const bands = h.incidents.map((i) => ({t0: toMs(i.opened_at) / 1000, t1: i.resolved_at ? toMs(i.resolved_at) / 1000 : t1,
    cls: `k-${i.kind}`, title: `${incKindName(i.kind)} · ${causeName(i.effective_cause)} (${i.rule})`}));
  const speeds = ["low", "full", "high", "super", "super+"];
  const width = box.clientWidth - 8;
  let html = Chart.strip([{label: t("present"), cls: "s-present", points: frac("present")}, {label: t("in_use"), cls: "s-in_use", points: frac("in_use")},
    {label: t("error"), cls: "s-error", points: errs.map((p) => [p[0], 1])}], bands, t0, t1, {step, fmtTime: fmtShort, title: t("chart_state"), width});
  html += Chart.bars(h.errors, t0, t1, {step, fmtTime: fmtShort, title: t("chart_errors"), cls: "s-error", width});
  html += Chart.lines([{name: "", cls: "c1", points: frac("speed_rank")}], t0, t1, {max: 4, step, fmtTime: fmtShort, title: t("chart_speed"), fmt: (v) => speeds[Math.round(v)] || "", width, height: 100});
  if (!s.present.length && !h.errors.length) html = `<p>${esc(t("no_data"))}</p>` + html;
  if (withEvents && h.events.length) {
    html += `<h4>${esc(t("events"))}</h4><ul class="events">${h.events.slice(0, 30).map((e) => `<li>${esc(fmt(e.ts, true))} ${esc(t(e.type))} ${esc(e.code || "")} ${e.in_use ? esc(t("in_use_yes")) : ""}</li>`).join("")}</ul>`;
  }
  box.innerHTML = html;
}

// ---------------------------------------------------------------- incident
async function renderIncident(id) {
  const mine = ++renderSeq;
  const [i] = await getJSON("/api/incidents/" + encodeURIComponent(id));
  if (mine !== renderSeq) return;
  const info = i.device_info || {};
  const rule = i.rule_text ? i.rule_text.explain[lang] : "";
  const ev = (e) => `<tr class="r-${esc(e.role)}">${td(t("time"), esc(fmt(e.ts, true)))}${td(t("type"), `${esc(t(e.type))} <small>${esc(e.boot)}#${esc(e.seq)}</small>`)}
      ${td(t("role"), esc(t(e.role)) + (e.device ? ` <small>${esc(e.device)}</small>` : ""))}
      ${td(t("code"), esc(e.code || ""))}${td(t("errno"), esc(e.errno ?? (e.problem_code ?? "")))}
      ${td(t("raw"), `<code>${esc(e.message || e.note || "")}</code>${e.reported_by ? ` <small>${esc(e.reported_by)} (${esc(e.via || "")})</small>` : ""}${e.flag ? ` <b class="flag">${esc(t("flag_mismatch"))}</b>` : ""}${e.stored === false ? esc(t("not_stored")) : ""}`)}
      ${td(t("use"), e.in_use === undefined || e.in_use === null ? "" : `${esc(t(e.in_use ? "in_use_yes" : "in_use_no"))} ${esc((e.users || []).join(", "))}`)}</tr>`;
  const evHead = `<thead><tr><th>${esc(t("time"))}</th><th>${esc(t("type"))}</th><th>${esc(t("role"))}</th><th>${esc(t("code"))}</th><th>${esc(t("errno"))}</th><th>${esc(t("raw"))}</th><th>${esc(t("use"))}</th></tr></thead>`;
  view.innerHTML = `<p><a href="#/">← ${esc(t("overview"))}</a> · <a href="#/room/${encodeURIComponent(i.agent)}">${esc(i.room_name || i.agent)}</a></p>
    <h2 id="d-title">${esc(incKindName(i.kind))} — ${esc(info.product || i.device)} <small>${esc(i.device)}</small></h2>
    <p id="d-summary" class="summary">${esc((i.summaries || {})[lang] || i.summary)}</p>
    <dl class="facts" id="d-facts">
      <dt>${esc(t("status"))}</dt><dd>${esc(t(i.status))} · ${esc(t("opened"))} ${esc(fmt(i.opened_at, true))}${i.resolved_at ? ` · ${esc(t("resolved_at"))} ${esc(fmt(i.resolved_at, true))}` : ""}</dd>
      <dt>${esc(t("computed_cause"))}</dt><dd id="d-computed">${esc(causeName(i.cause))} → ${esc(respName(i.responsible))} (${esc(t("confidence"))} ${esc(i.confidence)})</dd>
      <dt>${esc(t("decided_cause"))}</dt><dd id="d-decided">${i.decided_cause ? `<b>${esc(causeName(i.decided_cause))}</b> → ${esc(respName(i.decided_responsible))}; ${esc(t("decided_by"))} ${esc(i.decided_by)} ${esc(t("decided_at"))} ${esc(fmt(i.decided_at, true))}; ${esc(t("decided_reason"))}: ${esc(i.decided_reason)}` : "–"}</dd>
      <dt>${esc(t("rule"))}</dt><dd id="d-rule"><b>${esc(i.rule)}</b> · ${esc(t("policy"))} ${esc(i.policy ?? "")}: ${esc(rule)}</dd>
      <dt>${esc(t("unit"))}</dt><dd>${esc(i.unit_name || i.unit || t("unregistered"))} · ${esc(t("pic"))} ${esc(i.pic_name || "")}</dd>
      <dt>${esc(t("acknowledged"))}</dt><dd>${i.acknowledged_at ? `${esc(i.acknowledged_by)} ${esc(fmt(i.acknowledged_at, true))}` : "–"}</dd></dl>
    <div class="actions"><button id="d-ack" type="button" ${!can("acknowledge") || i.acknowledged_at ? "hidden" : ""}>${esc(t("acknowledge"))}</button>
      ${can("handling") ? `<button type="button" class="report" data-agent="${esc(i.agent)}" data-device="${esc(i.device)}">${esc(t("report_handling"))}</button>` : ""}</div>
    <fieldset id="d-override" ${can("override") ? "" : "hidden"}><legend>${esc(t("override"))}</legend>
      <select id="d-cause">${Object.keys(meta.causes[lang]).map((c) => `<option value="${esc(c)}">${esc(causeName(c))} → ${esc(respName(meta_resp(c)))}</option>`).join("")}</select>
      <input id="d-reason" placeholder="${esc(t("reason"))}" maxlength="1000">
      <button id="d-save" type="button">${esc(t("save"))}</button></fieldset>
    <fieldset id="d-comment-box" ${can("comment") ? "" : "hidden"}><legend>${esc(t("comment"))}</legend>
      <textarea id="d-comment" rows="2" maxlength="2000"></textarea>
      <button id="d-comment-save" type="button">${esc(t("add_comment"))}</button></fieldset>
    <p id="d-msg" role="status"></p>
    <h3>${esc(t("evidence"))}</h3><table id="d-evidence" class="cards">${evHead}<tbody>${i.evidence.map(ev).join("")}</tbody></table>
    ${i.host_wide_context.length ? `<h3>${esc(t("why_host_wide"))}</h3><table id="d-hostwide" class="cards">${evHead}<tbody>${i.host_wide_context.map(ev).join("")}</tbody></table>` : ""}
    <h3>${esc(t("history"))}</h3><div id="inc-chart"></div>
    <h3>${esc(t("audit"))}</h3><ol id="d-history">${i.history.map((h) => `<li>${esc(fmt(h.at, true))} <b>${esc(h.actor)}</b>: ${esc(actionName(h.action))} <small>(${esc(h.action)})</small>${h.detail && h.detail.text ? ": " + esc(h.detail.text) : ""}${h.detail && h.detail.reason ? ": " + esc(h.detail.reason) : ""}</li>`).join("")}</ol>`;
  const t0 = toMs(i.opened_at) / 1000 - 86400, t1 = Math.min(Date.now() / 1000, (i.resolved_at ? toMs(i.resolved_at) / 1000 : Date.now() / 1000) + 86400);
  if (Number.isFinite(t0)) deviceChart($("inc-chart"), i.device, i.agent, t0, Math.max(t1, t0 + 3600), mine, false);
  const after = async ([r, j]) => { $("d-msg").textContent = r.ok ? t("saved") : j.error; if (r.ok) { await renderIncident(id); $("d-msg").textContent = t("saved"); } };
  $("d-ack").addEventListener("click", async () => after(await post(`/api/incidents/${encodeURIComponent(id)}/ack`, {})));
  $("d-save").addEventListener("click", async () => after(await post(`/api/incidents/${encodeURIComponent(id)}/override`, {cause: $("d-cause").value, reason: $("d-reason").value})));
  $("d-comment-save").addEventListener("click", async () => {
    const text = $("d-comment").value.trim();
    if (text) after(await post(`/api/incidents/${encodeURIComponent(id)}/comment`, {text}));
  });
}
function meta_resp(cause) { const r = meta.rules.find((x) => x.cause === cause); return r ? r.responsible : ""; }

// ---------------------------------------------------------------- reports
async function renderReports() {
  const mine = ++renderSeq;
  const [units] = await getJSON("/api/units");
  if (mine !== renderSeq) return;
  const d = new Date(Date.now() + ZONES[tz] * 3600e3);
  const month = localStorage.getItem("pantau.month") || `${d.getUTCFullYear()}-${String(d.getUTCMonth() + 1).padStart(2, "0")}`;
  const unit = me.user.unit || ui.unit || (units[0] && units[0].id) || "";
  view.innerHTML = `<h2>${esc(t("unit_report"))}</h2>
    <div class="filters noprint"><label>${esc(t("unit"))} <select id="rep-unit" ${me.user.unit ? "disabled" : ""}>${units.map((u) => `<option value="${esc(u.id)}"${u.id === unit ? " selected" : ""}>${esc(u.name)}</option>`).join("")}</select></label>
      <label>${esc(t("month"))} <input id="rep-month" type="month" value="${esc(month)}"></label>
      <label>${esc(t("from"))} <input id="rep-from" type="date"></label><label>${esc(t("to"))} <input id="rep-to" type="date"></label>
      <button id="rep-show" type="button">${esc(t("show"))}</button> <a id="rep-csv" class="button" href="#">${esc(t("csv"))}</a>
      <button id="rep-print" type="button">${esc(t("print"))}</button></div>
    <div id="rep-box"></div>
    <h2>${esc(t("failure_rates"))}</h2><div class="noprint"><a id="fr-csv" class="button" href="#">${esc(t("csv"))}</a></div><div id="fr-box"></div>`;
  const show = async () => {
    const u = $("rep-unit").value, m = $("rep-month").value, f = $("rep-from").value, to = $("rep-to").value;
    localStorage.setItem("pantau.month", m);
    const p = f && to ? {from: f, to} : {month: m};
    $("rep-csv").href = "/api/reports/unit?" + qs({unit: u, ...p, format: "csv"});
    const [r] = await getJSON("/api/reports/unit?" + qs({unit: u, ...p}));
    if (mine !== renderSeq) return;
    const causeCols = Object.keys(r.by_cause);
    $("rep-box").innerHTML = `<section class="report" id="unit-report"><h3>${esc(r.unit_name)} · ${esc(t("period"))} ${esc(r.period)}</h3>
      <dl class="facts"><dt>${esc(t("pic"))}</dt><dd>${esc(r.pic || "")}</dd><dt>${esc(t("devices_lent"))}</dt><dd id="rep-lent">${esc(r.devices_lent)}</dd>
        <dt>${esc(t("device_days"))}</dt><dd>${esc(r.device_days)}</dd><dt>${esc(t("availability"))}</dt><dd id="rep-availability">${esc(pct(r.availability))}</dd>
        <dt>${esc(t("down_hours"))}</dt><dd>${esc(r.down_hours)}</dd><dt>${esc(t("incidents"))}</dt><dd id="rep-incidents">${esc(r.incidents)}</dd></dl>
      <div class="row"><div><h4>${esc(t("by_cause"))}</h4><ul>${causeCols.map((c) => `<li>${esc(causeName(c))}: <b>${esc(r.by_cause[c])}</b></li>`).join("")}</ul></div>
        <div><h4>${esc(t("by_responsible"))}</h4><ul>${Object.entries(r.by_responsible).map(([k, n]) => `<li>${esc(respName(k))}: <b>${esc(n)}</b></li>`).join("")}</ul></div></div>
      <table class="cards"><thead><tr><th>${esc(t("device"))}</th><th>${esc(t("room"))}</th><th>${esc(t("lease"))}</th><th>${esc(t("device_days"))}</th><th>${esc(t("down_hours"))}</th><th>${esc(t("incidents"))}</th>${causeCols.map((c) => `<th>${esc(causeName(c))}</th>`).join("")}</tr></thead>
        <tbody>${r.devices.map((x) => `<tr>${td(t("device"), esc(x.device))}${td(t("room"), esc(x.room_name || x.room || ""))}${td(t("lease"), `${esc(x.lease_start || "…")} – ${esc(x.lease_end || "…")}`)}
          ${td(t("device_days"), esc(x.device_days))}${td(t("down_hours"), esc(x.down_hours))}${td(t("incidents"), esc(x.incidents))}${causeCols.map((c) => td(causeName(c), esc(x.by_cause[c]))).join("")}</tr>`).join("")}</tbody></table>
      <h4>${esc(t("overrides"))}</h4><ul>${r.overrides.map((o) => `<li>${esc(o.device)}: ${esc(causeName(o.cause))} → <b>${esc(causeName(o.decided_cause))}</b>, ${esc(o.decided_by)} ${esc(fmt(o.decided_at))}: ${esc(o.decided_reason)}</li>`).join("") || `<li>–</li>`}</ul>
      <h4>${esc(t("incidents"))}</h4><table class="cards"><thead><tr><th>${esc(t("opened"))}</th><th>${esc(t("device"))}</th><th>${esc(t("kind"))}</th><th>${esc(t("cause"))}</th><th>${esc(t("responsible"))}</th></tr></thead>
        <tbody>${r.incident_list.map((x) => `<tr>${td(t("opened"), `<a href="#/incident/${encodeURIComponent(x.id)}">${esc(fmt(x.opened_at))}</a>`)}${td(t("device"), esc(x.device))}${td(t("kind"), esc(incKindName(x.kind)))}${td(t("cause"), esc(causeName(x.effective_cause)))}${td(t("responsible"), esc(respName(x.effective_responsible)))}</tr>`).join("")}</tbody></table></section>`;
  };
  const rates = async () => {
    const [r] = await getJSON("/api/reports/failure-rates");
    $("fr-csv").href = "/api/reports/failure-rates?format=csv";
    if (mine !== renderSeq) return;
    $("fr-box").innerHTML = `<p>${esc(t("period"))} ${esc(r.period)} · ${esc(t("per_100"))}</p><table id="rates" class="cards"><thead><tr><th>${esc(t("model"))}</th><th>${esc(t("firmware"))}</th><th>${esc(t("product"))}</th><th>${esc(t("devices"))}</th><th>${esc(t("device_months"))}</th><th>${esc(t("incidents"))}</th><th>${esc(t("per_100"))}</th><th>${esc(t("device_faults"))}</th><th>${esc(t("per_100"))}</th></tr></thead><tbody>` +
      r.rows.map((g) => `<tr>${td(t("model"), esc(g.model))}${td(t("firmware"), esc(g.firmware))}${td(t("product"), esc(g.product || ""))}${td(t("devices"), esc(g.devices))}${td(t("device_months"), esc(g.device_months))}${td(t("incidents"), esc(g.incidents))}${td(t("per_100"), esc(g.incidents_per_100 ?? "–"))}${td(t("device_faults"), esc(g.device_faults))}${td(t("per_100"), esc(g.faults_per_100 ?? "–"))}</tr>`).join("") + `</tbody></table>`;
  };
  $("rep-show").addEventListener("click", show);
  $("rep-print").addEventListener("click", () => window.print());
  await Promise.all([show(), rates()]);
}

// ---------------------------------------------------------------- the handling-report dialog (D1)
let reporting = null;
document.addEventListener("click", (e) => {
  const b = e.target.closest("button.report");
  if (!b) return;
  reporting = {agent: b.dataset.agent, device: b.dataset.device};
  $("r-device").textContent = `${b.dataset.device} — ${b.dataset.agent}`;
  $("r-note").value = "";
  $("r-confirm").checked = false;
  $("r-msg").textContent = "";
  $("report").showModal();
});
$("r-save").addEventListener("click", async () => {
  const note = $("r-note").value.trim();
  if (!note || !reporting) { $("r-note").focus(); return; }
  if (!$("r-confirm").checked) { $("r-confirm").focus(); $("r-msg").textContent = t("report_confirm"); return; }
  const [r, j] = await post("/api/handling", {agent: reporting.agent, device: reporting.device, note});
  $("r-msg").textContent = r.ok ? t("reported") + (j.flag ? ". " + t("report_flag") : "") : j.error;
});

// ---------------------------------------------------------------- routing, language, live changes
function parseRoute() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, query] = h.split("?");
  const parts = path.split("/").map(decodeURIComponent);
  return {name: parts[0] || "", args: parts.slice(1), query: new URLSearchParams(query || "")};
}
async function render() {
  route = parseRoute();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("on", a.dataset.route === route.name));
  try {
    if (route.name === "room") await renderRoom(route.args.join("/"));
    else if (route.name === "device") await renderDevice(route.args.join("/"), route.query.get("agent") || "");
    else if (route.name === "incident") await renderIncident(route.args.join("/"));
    else if (route.name === "reports") await renderReports();
    else await renderOverview();
  } catch (e) {
    if (e.message !== "signed out") view.innerHTML = `<p class="error">${esc(e.message)}</p><p><a href="#/">${esc(t("overview"))}</a></p>`;
  }
  document.body.dataset.ready = "1";
}

function applyLang() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  $("lang").textContent = lang === "id" ? "English" : "Bahasa Indonesia";
  $("who").textContent = `${me.user.name} (${t(me.user.role)}${me.user.unit ? ", " + me.user.unit : ""})`;
}

let pending = null, lastRun = 0;
function onChange(c) {
  const r = route.name;
  const touches = c.resync || (r === "" ) ||
    (r === "room" && c.agents.includes(route.args.join("/"))) ||
    (r === "device" && c.agents.includes(route.query.get("agent") || "")) ||
    (r === "incident" && c.incidents.includes(route.args.join("/")));
  if (!touches || document.querySelector("dialog[open]") || document.activeElement?.matches("textarea, input:not([type=search])")) return;
  const run = () => { pending = null; lastRun = Date.now(); render(); };
  if (pending) return;
  const wait = Math.max(0, 1000 - (Date.now() - lastRun));  // at most one refresh a second, the first at once
  pending = setTimeout(run, wait);
}
function live() {
  const es = new EventSource("/api/events");
  es.addEventListener("change", (e) => { try { onChange(JSON.parse(e.data)); } catch (err) { /* a malformed message changes nothing */ } });
  es.onopen = () => { $("live").textContent = "● " + t("live"); $("live").className = "on"; document.body.dataset.live = "1"; };
  es.onerror = () => { $("live").textContent = "○ " + t("live_off"); $("live").className = ""; };
}

(async () => {
  [me] = await getJSON("/api/me");
  [meta] = await getJSON("/api/meta");
  document.body.dataset.role = me.user.role;
  $("unit-box").hidden = Boolean(me.user.unit);
  $("tz").value = tz;
  if (!me.user.unit) {
    const [units] = await getJSON("/api/units");
    units.forEach((u) => $("unit").add(new Option(`${u.name} (${u.id})`, u.id)));
  }
  applyLang();
  $("unit").addEventListener("change", () => { ui.unit = $("unit").value; ui.rooms.offset = ui.inc.offset = 0; view.innerHTML = ""; render(); });
  $("tz").addEventListener("change", () => { tz = $("tz").value; localStorage.setItem("pantau.tz", tz); view.innerHTML = ""; render(); });
  $("lang").addEventListener("click", () => { lang = lang === "id" ? "en" : "id"; localStorage.setItem("pantau.lang", lang); applyLang(); view.innerHTML = ""; render(); });
  $("logout").addEventListener("click", async () => { await post("/api/logout", {}); location.replace("/login"); });
  window.addEventListener("hashchange", () => { view.innerHTML = ""; render(); });
  window.addEventListener("resize", fitTables);
  await render();
  live();
})();
