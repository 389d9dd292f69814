"""Notifications beyond incidents: a room PC offline longer than ``offline_after_s`` of working time,
and a room PC whose clock is more than 2 minutes off the collector's (the flags the dashboard shows,
computed by ``collector/fleet.py``).

``FleetWatch.check`` (run by the collector's 10 s housekeeping) compares each room PC's flags with
what was last announced, read back from the notifier's record (``notify_delivery``, rows
``fleet:<condition>:<agent>``), and records a change once on every channel: ``open`` when a
condition starts, ``resolved`` when it clears, ``withdrawn`` when the PC's broker account has been
disabled (decommissioned, lease ended: it is expected to be silent, so it is not announced as
offline). A change must hold for the notifier's ``delay_s`` before it is recorded, so a clock
hovering at the limit does not flap. The notifier's channel threads deliver it, retry it with
back-off and never send it twice, across restarts too. Text in Indonesian, then English.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from collector.fleet import FleetSettings, agent_flags
from collector.notify import STATUS_ID, Message, Notifier, header_safe
from collector.registry import lookup
from collector.store import Store
from common.protocol import format_epoch

SOURCE = "fleet"
CONDITIONS = ("offline_long", "clock_suspect")
STATUS_EN = {"open": "OPEN", "resolved": "RESOLVED", "withdrawn": "WITHDRAWN"}
TITLES = {  # (condition, status) -> (Indonesian, English)
    ("offline_long", "open"): ("PC ruangan offline terlalu lama", "room PC offline too long"),
    ("offline_long", "resolved"): ("PC ruangan terhubung lagi", "room PC connected again"),
    ("offline_long", "withdrawn"): ("akun broker PC ruangan dinonaktifkan", "room PC's broker account disabled"),
    ("clock_suspect", "open"): ("jam PC ruangan tidak tepat", "room PC clock off"),
    ("clock_suspect", "resolved"): ("jam PC ruangan tepat lagi", "room PC clock right again"),
    ("clock_suspect", "withdrawn"): ("akun broker PC ruangan dinonaktifkan", "room PC's broker account disabled"),
}
DAYS_ID = ("Senin", "Selasa", "Rabu", "Kamis", "Jumat", "Sabtu", "Minggu")
DAYS_EN = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def clock_suspect(a: dict[str, Any], s: FleetSettings) -> bool:
    off = a.get("clock_offset_s")
    return isinstance(off, int | float) and math.isfinite(off) and abs(off) > s.clock_suspect_s


class FleetWatch:
    """Announces room PCs offline too long in working hours and clocks off, through ``notifier``."""

    def __init__(self, store: Store, notifier: Notifier, settings: FleetSettings | None = None) -> None:
        self.store, self.notifier = store, notifier
        self.s = settings or FleetSettings()
        self._pending: dict[str, tuple[str, float]] = {}  # key -> (status wanted, since when, monotonic)
        notifier.add_source(SOURCE, self.render)

    # ---------------------------------------------------------------- what changed
    def check(self, now: float | None = None) -> list[tuple[str, str, str]]:
        """Record the confirmed changes; returns them as (condition, agent, status)."""
        now = time.time() if now is None else now
        mono = time.monotonic()
        announced = self.notifier.announced(SOURCE)
        disabled = {r["agent"]: r["disabled_reason"] or "-" for r in self.store.query(
            "SELECT agent, disabled_reason FROM agent_accounts WHERE disabled_at IS NOT NULL")}
        made: list[tuple[str, str, str]] = []
        for a in self.store.query("SELECT agent, state, reason, last_seen, clock_offset_s FROM agents"):
            agent = a["agent"]
            last = {c: announced.get(f"{c}:{agent}", ("", ""))[0] for c in CONDITIONS}
            if agent in disabled:
                on = dict.fromkeys(CONDITIONS, False)
            elif a["state"] != "online" and last["offline_long"] == "open":
                # announced and still offline: it ends only when the PC is back (no need to count hours)
                on = {"offline_long": True, "clock_suspect": clock_suspect(a, self.s)}
            else:
                f = agent_flags(a, now, self.s)
                on = {c: bool(f[c]) for c in CONDITIONS}
            for cond in CONDITIONS:
                key = f"{cond}:{agent}"
                want = None
                if on[cond] and last[cond] != "open":
                    want = "open"
                elif not on[cond] and last[cond] == "open":
                    want = "withdrawn" if agent in disabled else "resolved"
                if want is None:
                    self._pending.pop(key, None)
                    continue
                seen = self._pending.get(key)
                if seen is None or seen[0] != want:
                    seen = self._pending[key] = (want, mono)
                if mono - seen[1] < self.notifier.cfg.delay_s:
                    continue
                f = agent_flags(a, now, self.s)
                self.notifier.record(SOURCE, key, want, cond, {
                    "at": format_epoch(now), "state": a["state"], "reason": a["reason"], "heard_at": f["heard_at"],
                    "offline_working_s": f["offline_working_s"], "clock_offset_s": f["clock_offset_s"],
                    "disabled_reason": disabled.get(agent)})
                del self._pending[key]
                made.append((cond, agent, want))
        return made

    # ---------------------------------------------------------------- what is said
    def render(self, d: dict[str, Any]) -> Message | None:
        """The message of one ``notify_delivery`` row: the facts recorded with the change (the same on
        every retry), the unit, room and PIC as the registry has them now."""
        cond, _, agent = d["incident"][len(SOURCE) + 1:].partition(":")
        try:
            facts = json.loads(d.get("detail") or "")
        except ValueError:
            return None
        if cond not in CONDITIONS or not isinstance(facts, dict) or not agent:
            return None
        status = d["status"]
        reg = lookup(self.store, "", agent)
        t_id, t_en = TITLES.get((cond, status), (cond, cond))
        room = header_safe(reg.get("room_name") or reg.get("room") or "-", 200)
        unit = header_safe(reg.get("unit_name") or reg.get("unit") or "unit tidak terdaftar", 200)
        subject = (f"[Pantau] {STATUS_ID.get(status, status)}/{STATUS_EN.get(status, status)}: {t_id} / {t_en}: "
                   f"{agent} — {room}, {unit}")
        id_lines, en_lines = self._sentences(cond, status, agent, facts)
        pic = reg.get("pic") or {}
        url = self.notifier.cfg.dashboard_url
        body = "\n".join([*id_lines, "", *en_lines, "",
                          f"Unit: {unit}  Ruang/room: {room}  PC: {agent}",
                          "PIC: " + (", ".join(header_safe(str(pic[k]), 200) for k in ("name", "email", "phone")
                                               if pic.get(k)) or "-"),
                          f"Rincian / details: {url.rstrip('/')}/#/room/{agent}" if url else ""]).rstrip() + "\n"
        payload = {"fleet": {"condition": cond, "status": status, "agent": agent, **facts,
                             "offline_after_s": self.s.offline_after_s, "clock_limit_s": self.s.clock_suspect_s,
                             "summary": {"id": id_lines[0], "en": en_lines[0]}},
                   "registry": reg}
        return Message(subject, body, payload, pic.get("email"))

    def _sentences(self, cond: str, status: str, agent: str, f: dict[str, Any]) -> tuple[list[str], list[str]]:
        s = self.s
        at, heard_t = _epoch(f.get("at")), _epoch(f.get("heard_at"))
        when_id = self._local(at) if at is not None else "-"
        when_en = self._local(at, "en") if at is not None else "-"
        why = header_safe(str(f.get("disabled_reason") or "-"), 200)
        reason = header_safe(str(f.get("reason") or "-"), 100)
        raw = f.get("offline_working_s")
        down = float(raw) if isinstance(raw, int | float) else 0.0
        since_id = self._local(heard_t) if heard_t is not None else "tidak diketahui"
        since_en = self._local(heard_t, "en") if heard_t is not None else "unknown"
        if status == "withdrawn":
            return ([f"Akun broker PC ruangan {agent} dinonaktifkan (alasan: {why}); PC ini tidak lagi diharapkan "
                     f"terhubung, jadi tidak diberitahukan lagi sebagai offline atau jamnya tidak tepat."],
                    [f"The broker account of room PC {agent} was disabled (reason: {why}); it is no longer expected "
                     "to connect, so it is no longer announced as offline or clock off."])
        if cond == "offline_long":
            hours_id = (f"{'/'.join(DAYS_ID[d] for d in s.work_days)} {s.work_start_h:02d}:00–{s.work_end_h:02d}:00 "
                        f"{self._zone()}")
            hours_en = (f"{'/'.join(DAYS_EN[d] for d in s.work_days)} {s.work_start_h:02d}:00–{s.work_end_h:02d}:00 "
                        f"{self._zone()}")
            if status == "open":
                return ([f"PC ruangan {agent} tidak terhubung sejak {since_id}: {_dur(down)} dalam "
                         f"jam kerja ({hours_id}), melebihi batas {_dur(s.offline_after_s)}. Alasan terakhir: "
                         f"{reason}. Perangkat di ruangan ini tidak dipantau selama PC offline."],
                        [f"Room PC {agent} has been offline since {since_en}: {_dur(down, 'en')} "
                         f"of working time ({hours_en}), more than {_dur(s.offline_after_s, 'en')}. Last reason: "
                         f"{reason}. The room's devices are not watched while the PC is offline."])
            return ([f"PC ruangan {agent} terhubung lagi (tercatat {when_id})."],
                    [f"Room PC {agent} is connected again (noted {when_en})."])
        off = f.get("clock_offset_s")
        off = float(off) if isinstance(off, int | float) and math.isfinite(off) else None
        limit_id, limit_en = _dur(s.clock_suspect_s), _dur(s.clock_suspect_s, "en")
        if status == "open" and off is not None:
            side_id = "terlambat" if off > 0 else "terlalu cepat"
            side_en = "behind" if off > 0 else "ahead of"
            return ([f"Jam PC ruangan {agent} {side_id} {_dur(abs(off))} dari jam collector (batas ±{limit_id}). "
                     "Waktu yang dilaporkan PC ini bisa meleset sebesar itu; periksa sinkronisasi waktu (NTP) PC."],
                    [f"The clock of room PC {agent} is {_dur(abs(off), 'en')} {side_en} the collector's "
                     f"(limit ±{limit_en}). The times it reports may be off by that much; check the PC's time "
                     "synchronisation (NTP)."])
        shown = "-" if off is None else f"{off:+.0f} s"
        return ([f"Jam PC ruangan {agent} kembali dalam batas ±{limit_id} (selisih {shown}, tercatat {when_id})."],
                [f"The clock of room PC {agent} is within ±{limit_en} again (offset {shown}, noted {when_en})."])

    def _zone(self) -> str:
        h = self.s.tz_offset_h
        named = {7.0: "WIB", 8.0: "WITA", 9.0: "WIT"}
        return named.get(h) or f"UTC{'+' if h >= 0 else '-'}{abs(h):g}"

    def _local(self, t: float, lang: str = "id") -> str:
        dt = datetime.fromtimestamp(t, UTC) + timedelta(hours=self.s.tz_offset_h)
        day = (DAYS_ID if lang == "id" else DAYS_EN)[dt.weekday()]
        return f"{day} {dt:%Y-%m-%d %H:%M} {self._zone()}"


def _epoch(ts: Any) -> float | None:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if isinstance(ts, str) else None
    except ValueError:
        return None


def _dur(seconds: float, lang: str = "id") -> str:
    """3 j 5 m / 3 h 5 min; under a minute in seconds."""
    total = round(seconds)
    h, rem = divmod(total, 3600)
    m, sec = divmod(rem, 60)
    if lang == "id":
        parts = [f"{h} j" if h else "", f"{m} m" if m else "", f"{sec} d" if sec and not h else ""]
    else:
        parts = [f"{h} h" if h else "", f"{m} min" if m else "", f"{sec} s" if sec and not h else ""]
    return " ".join(p for p in parts if p) or ("0 d" if lang == "id" else "0 s")
