"use strict";
const T = {
  id: {tagline:"Kesehatan perangkat video conference pinjaman", unit:"Unit", all_units:"Semua unit", fleet:"Ruangan",
       room_pc:"PC ruangan", status:"Status", devices:"Perangkat", last_seen:"Terakhir terlihat", incidents:"Insiden",
       opened:"Dibuka", device:"Perangkat", kind:"Jenis", cause:"Penyebab", responsible:"Tanggung jawab",
       override:"Ubah penyebab", reason:"Alasan", by:"Nama", save:"Simpan", close:"Tutup", detail:"Rincian",
       online:"daring", offline:"luring", open:"terbuka", resolved:"selesai", withdrawn:"dibatalkan",
       device_fault:"kerusakan perangkat", handling_damage:"kerusakan penanganan", host_issue:"masalah PC/lingkungan",
       needs_inspection:"perlu diperiksa", central_it:"Pusdatin", none:"tidak ada", undetermined:"belum ditentukan",
       device_error:"error perangkat", device_missing:"perangkat hilang", device_unstable:"tidak stabil",
       unregistered:"tidak terdaftar", saved:"Tersimpan", none_yet:"Belum ada", report:"lapor penanganan",
       report_note:"Apa yang terjadi pada perangkat ini? (mis. jatuh, kabel tertarik)", report_by:"Nama pelapor",
       reported:"Laporan tercatat"},
  en: {tagline:"Health of lent video-conference kits", unit:"Unit", all_units:"All units", fleet:"Rooms",
       room_pc:"Room PC", status:"Status", devices:"Devices", last_seen:"Last seen", incidents:"Incidents",
       opened:"Opened", device:"Device", kind:"Kind", cause:"Cause", responsible:"Responsible",
       override:"Override cause", reason:"Reason", by:"Your name", save:"Save", close:"Close", detail:"Details",
       online:"online", offline:"offline", open:"open", resolved:"resolved", withdrawn:"withdrawn",
       device_fault:"device fault", handling_damage:"handling damage", host_issue:"host/environment",
       needs_inspection:"needs inspection", central_it:"central IT", none:"none", undetermined:"undetermined",
       device_error:"device error", device_missing:"device missing", device_unstable:"unstable",
       unregistered:"unregistered", saved:"Saved", none_yet:"None yet", report:"report handling",
       report_note:"What happened to this device? (e.g. dropped, cable pulled)", report_by:"Your name",
       reported:"Report recorded"},
};
let lang = localStorage.getItem("pantau.lang") || "id";
const t = (k) => (T[lang][k] ?? k);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const unitSel = document.getElementById("unit");
let current = null;

function applyLang() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-ph]").forEach((el) => { el.placeholder = t(el.dataset.i18nPh); });
  document.getElementById("lang").textContent = lang === "id" ? "English" : "Bahasa Indonesia";
}

async function getJSON(url) { const r = await fetch(url); if (!r.ok) throw new Error(url + " " + r.status); return r.json(); }

async function refresh() {
  const unit = unitSel.value;
  const q = unit ? "?unit=" + encodeURIComponent(unit) : "";
  const [agents, incidents, units] = await Promise.all([getJSON("/api/agents" + q), getJSON("/api/incidents" + q), getJSON("/api/units")]);
  if (unitSel.options.length === 1) units.forEach((u) => unitSel.add(new Option(u.name + " (" + u.id + ")", u.id)));
  document.querySelector("#agents tbody").innerHTML = agents.map((a) => `<tr>
    <td>${esc(a.agent)}</td><td class="${esc(a.state)}">${esc(t(a.state || "offline"))}</td>
    <td>${esc((a.labels || {}).unit)}</td>
    <td>${(a.inventory || []).map((d) => esc(d.product || d.key) + " <small>(" + esc(d.port) + ", " + esc(d.speed) + ")</small> "
      + `<button type="button" class="report" data-agent="${esc(a.agent)}" data-device="${esc(d.key)}">${t("report")}</button>`).join("<br>")}</td>
    <td>${esc(a.last_seen)}</td></tr>`).join("") || `<tr><td colspan="5">${t("none_yet")}</td></tr>`;
  document.querySelector("#incidents tbody").innerHTML = incidents.map((i) => `<tr data-id="${esc(i.id)}">
    <td>${esc(i.opened_at)}</td><td>${esc(i.device)}<br><small>${esc(i.agent)}</small></td><td>${esc(t(i.kind))}</td>
    <td class="cause-${esc(i.effective_cause)}">${esc(t(i.effective_cause))}${i.decided_cause ? " ✎" : ""} <small>${esc(i.rule)}</small></td>
    <td>${esc(t(i.effective_responsible))}</td>
    <td>${esc(i.registry.unit_name || t("unregistered"))}</td><td>${esc(i.registry.pic ? i.registry.pic.name : "")}</td>
    <td>${esc(t(i.status))}</td><td><button type="button" class="open-detail">${t("detail")}</button></td></tr>`).join("")
    || `<tr><td colspan="9">${t("none_yet")}</td></tr>`;
  document.querySelectorAll(".open-detail").forEach((b) => b.addEventListener("click", () => openDetail(b.closest("tr").dataset.id)));
  document.querySelectorAll("button.report").forEach((b) => b.addEventListener("click", () => reportHandling(b.dataset.agent, b.dataset.device)));
}

async function reportHandling(agent, device) {
  const note = window.prompt(t("report_note"));
  if (!note) return;
  const by = window.prompt(t("report_by"));
  if (!by) return;
  const r = await fetch("/api/handling", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({agent, device, note, by})});
  const j = await r.json();
  window.alert(r.ok ? t("reported") : j.error);
  refresh();
}

async function openDetail(id) {
  const i = await getJSON("/api/incidents/" + encodeURIComponent(id));
  current = i;
  document.getElementById("d-title").textContent = `${t(i.kind)} — ${i.device}`;
  document.getElementById("d-summary").textContent = (i.summaries || {})[lang] || i.summary;
  document.getElementById("d-evidence").innerHTML = i.evidence.map((e) => `<li>${esc(e.ts)} ${esc(e.type)} <small>(${esc(e.boot)}#${esc(e.seq)})</small></li>`).join("");
  document.getElementById("d-history").innerHTML = i.history.map((h) => `<li>${esc(h.at)} ${esc(h.actor)}: ${esc(h.action)}</li>`).join("");
  document.getElementById("d-msg").textContent = "";
  document.getElementById("detail").showModal();
}

document.getElementById("d-save").addEventListener("click", async () => {
  const body = {cause: document.getElementById("d-cause").value, reason: document.getElementById("d-reason").value,
                by: document.getElementById("d-by").value};
  const r = await fetch(`/api/incidents/${encodeURIComponent(current.id)}/override`, {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const j = await r.json();
  document.getElementById("d-msg").textContent = r.ok ? t("saved") : j.error;
  if (r.ok) {
    const fresh = await getJSON("/api/incidents/" + encodeURIComponent(current.id));
    document.getElementById("d-history").innerHTML = fresh.history.map((h) => `<li>${esc(h.at)} ${esc(h.actor)}: ${esc(h.action)}</li>`).join("");
    refresh();
  }
});
document.getElementById("lang").addEventListener("click", () => { lang = lang === "id" ? "en" : "id"; localStorage.setItem("pantau.lang", lang); applyLang(); refresh(); });
unitSel.addEventListener("change", refresh);
applyLang();
refresh();
setInterval(refresh, 5000);
