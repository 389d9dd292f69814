"use strict";
const T = {
  id: {tagline: "Kesehatan perangkat video conference pinjaman", sign_in: "Masuk", username: "Nama pengguna",
       password: "Kata sandi", signing_in: "Sedang masuk…"},
  en: {tagline: "Health of lent video-conference kits", sign_in: "Sign in", username: "User name",
       password: "Password", signing_in: "Signing in…"},
};
let lang = localStorage.getItem("pantau.lang") || "id";
const t = (k) => (T[lang][k] ?? k);
const msg = document.getElementById("msg");

function applyLang() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.getElementById("lang").textContent = lang === "id" ? "English" : "Bahasa Indonesia";
}

async function signIn(body) {
  msg.textContent = t("signing_in");
  const r = await fetch("/api/login", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body), credentials: "same-origin"});
  if (r.ok) { location.replace("/"); return; }
  let j = {};
  try { j = await r.json(); } catch (e) { j = {error: String(r.status)}; }
  msg.textContent = j.error || String(r.status);
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  signIn({username: document.getElementById("username").value, password: document.getElementById("password").value});
});
document.getElementById("lang").addEventListener("click", () => {
  lang = lang === "id" ? "en" : "id"; localStorage.setItem("pantau.lang", lang); applyLang();
});
applyLang();
// A one-time sign-in link (printed by `pantau-collector demo`): /login#once=TOKEN. The fragment never
// reaches a server log; it is removed from the address bar before it is used.
const once = new URLSearchParams(location.hash.slice(1)).get("once");
if (once) { history.replaceState(null, "", "/login"); signIn({once}); }
