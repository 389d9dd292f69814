"use strict";
const T = {
  id: {tagline:"Kesehatan perangkat video conference pinjaman", unit:"Unit", all_units:"Semua unit", fleet:"Ruangan",
       room_pc:"PC ruangan", status:"Status", devices:"Perangkat", last_seen:"Terakhir terlihat", incidents:"Insiden",
       opened:"Dibuka", device:"Perangkat", kind:"Jenis", cause:"Penyebab", responsible:"Tanggung jawab",
       override:"Ubah penyebab", reason:"Alasan", save:"Simpan", close:"Tutup", detail:"Rincian",
       online:"daring", offline:"luring", open:"terbuka", resolved:"selesai", withdrawn:"dibatalkan",
       device_fault:"kerusakan perangkat", handling_damage:"kerusakan penanganan", host_issue:"masalah PC/lingkungan",
       needs_inspection:"perlu diperiksa", central_it:"Pusdatin", none:"tidak ada", undetermined:"belum ditentukan",
       device_error:"error perangkat", device_missing:"perangkat hilang", device_unstable:"tidak stabil",
       unregistered:"tidak terdaftar", saved:"Tersimpan", none_yet:"Belum ada", report:"lapor penanganan",
       report_note:"Apa yang terjadi pada perangkat ini? (mis. jatuh, kabel tertarik)", reported:"Laporan tercatat",
       sign_out:"Keluar", clock:"Jam", clock_off:"jam PC selisih", clock_ok:"tepat", comment:"Komentar",
       add_comment:"Tambah komentar", acknowledge:"Tandai sudah dilihat", acknowledged:"Sudah dilihat",
       rule:"aturan", policy:"kebijakan", admin:"admin", operator:"operator", pic:"PIC", viewer:"pembaca"},
  en: {tagline:"Health of lent video-conference kits", unit:"Unit", all_units:"All units", fleet:"Rooms",
       room_pc:"Room PC", status:"Status", devices:"Devices", last_seen:"Last seen", incidents:"Incidents",
       opened:"Opened", device:"Device", kind:"Kind", cause:"Cause", responsible:"Responsible",
       override:"Override cause", reason:"Reason", save:"Save", close:"Close", detail:"Details",
       online:"online", offline:"offline", open:"open", resolved:"resolved", withdrawn:"withdrawn",
       device_fault:"device fault", handling_damage:"handling damage", host_issue:"host/environment",
       needs_inspection:"needs inspection", central_it:"central IT", none:"none", undetermined:"undetermined",
       device_error:"device error", device_missing:"device missing", device_unstable:"unstable",
       unregistered:"unregistered", saved:"Saved", none_yet:"None yet", report:"report handling",
       report_note:"What happened to this device? (e.g. dropped, cable pulled)", reported:"Report recorded",
       sign_out:"Sign out", clock:"Clock", clock_off:"PC clock off by", clock_ok:"ok", comment:"Comment",
       add_comment:"Add comment", acknowledge:"Acknowledge", acknowledged:"Acknowledged",
       rule:"rule", policy:"policy", admin:"admin", operator:"operator", pic:"PIC", viewer:"viewer"},
};
let lang = localStorage.getItem("pantau.lang") || "id";
const t = (k) => (T[lang][k] ?? k);
// Every string from agents, USB descriptors, the registry or people goes through esc() before innerHTML.
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const $ = (id) => document.getElementById(id);
const unitSel = $("unit");
let me = null;
let current = null;
let reporting = null;
const can = (p) => Boolean(me && me.user.permissions.includes(p));

async function api(url, opts = {}) {
  const r = await fetch(url, {credentials: "same-origin", ...opts});
  if (r.status === 401) { location.replace("/login"); throw new Error("signed out"); }
  return r;
}
async function getJSON(url) { const r = await api(url); if (!r.ok) throw new Error(url + " " + r.status); return r.json(); }
async function post(url, body) {
  const r = await api(url, {method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRF-Token": me.csrf || ""}});
  let j = {};
  try { j = await r.json(); } catch (e) { j = {error: String(r.status)}; }
  return [r, j];
}

function applyLang() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-ph]").forEach((el) => { el.placeholder = t(el.dataset.i18nPh); });
  $("lang").textContent = lang === "id" ? "English" : "Bahasa Indonesia";
  if (me) $("who").textContent = `${me.user.name} (${t(me.user.role)}${me.user.unit ? ", " + me.user.unit : ""})`;
}

function clockCell(a) {
  if (a.clock_offset_s === null || a.clock_offset_s === undefined) return "";
  const off = Math.round(a.clock_offset_s);
  return a.clock_suspect ? `<span class="clock-off" title="${esc(a.clock)}">⚠ ${esc(t("clock_off"))} ${esc(off)} s</span>`
                         : `<span class="clock-ok">${esc(t("clock_ok"))} (${esc(off)} s)</span>`;
}

function historyHTML(history) {
  return history.map((h) => {
    const text = h.action === "commented" && h.detail && h.detail.text ? ": " + esc(h.detail.text) : "";
    return `<li>${esc(h.at)} ${esc(h.actor)}: ${esc(h.action)}${text}</li>`;
  }).join("");
}

async function refresh() {
  const unit = me.user.unit ? "" : unitSel.value;
  const q = unit ? "?unit=" + encodeURIComponent(unit) : "";
  const [agents, incidents, units] = await Promise.all([getJSON("/api/agents" + q), getJSON("/api/incidents" + q), getJSON("/api/units")]);
  if (unitSel.options.length === 1) units.forEach((u) => unitSel.add(new Option(u.name + " (" + u.id + ")", u.id)));
  const report = can("handling");
  $("agents").querySelector("tbody").innerHTML = agents.map((a) => `<tr data-agent="${esc(a.agent)}">
    <td>${esc(a.agent)}</td><td class="${esc(a.state)}">${esc(t(a.state || "offline"))}</td>
    <td>${esc(a.unit)}</td>
    <td>${(a.inventory || []).map((d) => esc(d.product || d.key) + " <small>(" + esc(d.vendor) + ", " + esc(d.port) + ", " + esc(d.speed) + ")</small> "
      + (report ? `<button type="button" class="report" data-agent="${esc(a.agent)}" data-device="${esc(d.key)}">${esc(t("report"))}</button>` : "")).join("<br>")}</td>
    <td>${esc(a.last_seen)}</td><td>${clockCell(a)}</td></tr>`).join("") || `<tr><td colspan="6">${esc(t("none_yet"))}</td></tr>`;
  $("incidents").querySelector("tbody").innerHTML = incidents.map((i) => `<tr data-id="${esc(i.id)}">
    <td>${esc(i.opened_at)}</td><td>${esc(i.device)}<br><small>${esc(i.agent)}</small></td><td>${esc(t(i.kind))}</td>
    <td class="cause-${esc(i.effective_cause)}">${esc(t(i.effective_cause))}${i.decided_cause ? " ✎" : ""} <small>${esc(i.rule)}</small></td>
    <td>${esc(t(i.effective_responsible))}</td>
    <td>${esc(i.registry.unit_name || t("unregistered"))}</td><td>${esc(i.registry.pic ? i.registry.pic.name : "")}</td>
    <td>${esc(t(i.status))}${i.acknowledged_at ? " ✓" : ""}</td><td><button type="button" class="open-detail">${esc(t("detail"))}</button></td></tr>`).join("")
    || `<tr><td colspan="9">${esc(t("none_yet"))}</td></tr>`;
  document.querySelectorAll(".open-detail").forEach((b) => b.addEventListener("click", () => openDetail(b.closest("tr").dataset.id)));
  document.querySelectorAll("button.report").forEach((b) => b.addEventListener("click", () => openReport(b.dataset.agent, b.dataset.device)));
}

function openReport(agent, device) {
  reporting = {agent, device};
  $("r-device").textContent = `${device} — ${agent}`;
  $("r-note").value = "";
  $("r-msg").textContent = "";
  $("report").showModal();
}

$("r-save").addEventListener("click", async () => {
  const note = $("r-note").value.trim();
  if (!note || !reporting) return;
  const [r, j] = await post("/api/handling", {agent: reporting.agent, device: reporting.device, note});
  $("r-msg").textContent = r.ok ? t("reported") : j.error;
  if (r.ok) refresh();
});

async function showDetail(i) {
  current = i;
  $("d-title").textContent = `${t(i.kind)} — ${i.device}`;
  $("d-summary").textContent = (i.summaries || {})[lang] || i.summary;
  $("d-rule").textContent = `${t("rule")} ${i.rule} · ${t("policy")} ${i.policy ?? ""}`;
  $("d-evidence").innerHTML = i.evidence.map((e) => `<li>${esc(e.ts)} ${esc(e.type)} <small>(${esc(e.boot)}#${esc(e.seq)})</small></li>`).join("");
  $("d-history").innerHTML = historyHTML(i.history);
  $("d-ack").hidden = !can("acknowledge") || Boolean(i.acknowledged_at);
}

async function openDetail(id) {
  await showDetail(await getJSON("/api/incidents/" + encodeURIComponent(id)));
  $("d-msg").textContent = "";
  $("detail").showModal();
}

async function afterChange(r, j) {
  $("d-msg").textContent = r.ok ? t("saved") : j.error;
  if (r.ok) {
    await showDetail(await getJSON("/api/incidents/" + encodeURIComponent(current.id)));
    refresh();
  }
}

$("d-save").addEventListener("click", async () => {
  const [r, j] = await post(`/api/incidents/${encodeURIComponent(current.id)}/override`,
                            {cause: $("d-cause").value, reason: $("d-reason").value});
  afterChange(r, j);
});
$("d-ack").addEventListener("click", async () => {
  const [r, j] = await post(`/api/incidents/${encodeURIComponent(current.id)}/ack`, {});
  afterChange(r, j);
});
$("d-comment-save").addEventListener("click", async () => {
  const text = $("d-comment").value.trim();
  if (!text) return;
  const [r, j] = await post(`/api/incidents/${encodeURIComponent(current.id)}/comment`, {text});
  if (r.ok) $("d-comment").value = "";
  afterChange(r, j);
});
$("logout").addEventListener("click", async () => { await post("/api/logout", {}); location.replace("/login"); });
$("lang").addEventListener("click", () => { lang = lang === "id" ? "en" : "id"; localStorage.setItem("pantau.lang", lang); applyLang(); refresh(); });
unitSel.addEventListener("change", refresh);

(async () => {
  me = await getJSON("/api/me");
  $("unit-box").hidden = Boolean(me.user.unit);
  $("d-override").hidden = !can("override");
  $("d-comment-box").hidden = !can("comment");
  document.body.dataset.role = me.user.role;
  applyLang();
  await refresh();
  document.body.dataset.ready = "1";
  setInterval(refresh, 5000);
})();
