"""Incident lifecycle: open, revise, resolve, reopen, withdraw; acknowledge and override.

The evaluator says what incidents the evidence supports now; this book compares that
with what it recorded before and writes every change to the audit chain. Nothing is ever
deleted: an incident the evidence no longer supports is kept as ``withdrawn``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from collector import audit
from collector.classify import Incident, summary
from collector.policy import CAUSES, RESPONSIBLE_OF_CAUSE, Windows
from collector.store import Store
from collector.store.sqlite import dumps
from common.protocol import ProtocolError, ts_seconds, ts_seconds_or_none

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]
FinalTest = Callable[[float], bool]


def _refs(row: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        refs = json.loads(row.get("evidence") or "[]")
    except ValueError:
        return []
    return [r for r in refs if isinstance(r, dict)] if isinstance(refs, list) else []


def _is_final(row: dict[str, Any], final: FinalTest, settled_before: float = float("-inf")) -> bool:
    """A recorded incident whose evidence has aged out. Rows recorded before ``needs_from`` existed
    read from their opening minus a day."""
    needs_from = row.get("needs_from")
    if needs_from is None:
        try:
            needs_from = ts_seconds(row["opened_at"]) - 86400
        except ProtocolError:
            return True  # a time no policy can read: leave it as it is
    if row.get("status") == "resolved":
        resolved = ts_seconds_or_none(row.get("resolved_at"))
        if resolved is not None and resolved < settled_before:
            return True
    return final(float(needs_from))


class IncidentError(ValueError):
    pass


class IncidentBook:
    def __init__(self, store: Store, lang: str = "id") -> None:
        self.store = store
        self.lang = lang
        self.listeners: list[Listener] = []

    def _notify(self, action: str, row: dict[str, Any]) -> None:
        for fn in self.listeners:
            try:
                fn(action, row)
            except Exception:
                log.exception("incident listener failed")

    def sync(self, agent: str, computed: list[Incident], now: str, windows: Windows, final: FinalTest,
             settled_before: float = float("-inf")) -> list[str]:
        """Bring the recorded incidents of ``agent`` in line with ``computed``; returns the actions.

        ``final(needs_from)`` says whether the evidence a decision reads from ``needs_from`` on has
        aged out of what is kept: such an incident is final. So is one resolved before ``settled_before``
        (nothing can reopen it any more). A final incident is never withdrawn, revised or reopened, and a
        computed incident in that zone, or made of a final one's remains, is not recorded."""
        actions: list[tuple[str, str]] = []  # (incident id, action), in the order they happened
        with self.store.tx(lead=True) as db:  # only the classifying collector's (LostLead otherwise)

            def record(iid: str, action: str, detail: dict[str, Any]) -> None:
                audit.append(db, now, "pantau", iid, action, detail)
                actions.append((iid, action))

            cur = db.execute("SELECT * FROM incidents WHERE agent = ?", (agent,))
            cols = [d[0] for d in cur.description]
            stored = {r[0]: dict(zip(cols, r, strict=True)) for r in cur.fetchall()}
            seen = set()
            # the trouble of final incidents: what is left of it after pruning belongs to them, never to a
            # new incident made of their remains (read only when something new is computed: remains would
            # always carry a new id)
            settled = {(e.get("boot"), e.get("seq")) for old in stored.values() if _is_final(old, final, settled_before)
                       for e in _refs(old)} if any(inc.id not in stored for inc in computed) else set()
            for inc in computed:
                needs_from = inc.needs_from(windows)
                if final(needs_from) or any((t.boot, t.seq) in settled for t in inc.trouble if not t.synthetic):
                    continue
                j = inc.to_json(self.lang)
                iid = j["id"]
                seen.add(iid)
                old = stored.get(iid)
                if old is not None and _is_final(old, final, settled_before):
                    continue
                summaries = dumps({lang: summary(inc, lang) for lang in ("id", "en")})
                status = "resolved" if j["resolved_at"] else "open"
                row = {"id": iid, "agent": agent, "device": j["device"], "kind": j["kind"], "status": status,
                       "cause": j["cause"], "responsible": j["responsible"], "confidence": j["confidence"],
                       "rule": j["rule"], "policy": j["policy"], "opened_at": j["opened_at"],
                       "resolved_at": j["resolved_at"], "evidence": dumps(j["evidence"]), "summary": j["summary"],
                       "summaries": summaries, "needs_from": needs_from, "updated_at": now}
                if old is None:
                    db.execute(f"INSERT INTO incidents ({','.join(row)}) VALUES ({','.join('?' * len(row))})",
                               tuple(row.values()))
                    record(iid, "opened", {"rule": j["rule"], "cause": j["cause"], "policy": j["policy"],
                                           "opened_at": j["opened_at"]})
                    if status == "resolved":
                        record(iid, "resolved", {"resolved_at": j["resolved_at"]})
                    continue
                if old["status"] == "withdrawn":
                    record(iid, "reinstated", {"rule": j["rule"], "policy": j["policy"]})
                if old["rule"] != j["rule"] or old.get("policy") != j["policy"]:
                    record(iid, "revised", {"from": {"rule": old["rule"], "cause": old["cause"],
                                                     "policy": old.get("policy")},
                                            "to": {"rule": j["rule"], "cause": j["cause"], "policy": j["policy"]}})
                if old["resolved_at"] is None and j["resolved_at"] is not None:
                    record(iid, "resolved", {"resolved_at": j["resolved_at"]})
                elif old["resolved_at"] is not None and j["resolved_at"] is None and old["status"] != "withdrawn":
                    record(iid, "reopened", {"previously_resolved_at": old["resolved_at"]})
                changed = {k: v for k, v in row.items() if k != "updated_at" and old.get(k) != v}
                if changed:
                    sets = ",".join(f"{k} = ?" for k in changed)
                    db.execute(f"UPDATE incidents SET {sets}, updated_at = ? WHERE id = ?",
                               (*changed.values(), now, iid))
            for sid, old in stored.items():
                if sid in seen or old["status"] == "withdrawn" or _is_final(old, final, settled_before):
                    continue
                db.execute("UPDATE incidents SET status = 'withdrawn', updated_at = ? WHERE id = ?", (now, sid))
                record(sid, "withdrawn", {"reason": "the evidence no longer supports it"})
        for iid, action in actions:
            rows = self.store.query("SELECT * FROM incidents WHERE id = ?", (iid,))
            if rows:
                self._notify(action, rows[0])
        return [a for _, a in actions]

    def get(self, incident_id: str) -> dict[str, Any] | None:
        rows = self.store.query("SELECT * FROM incidents WHERE id = ?", (incident_id,))
        return rows[0] if rows else None

    def override(self, incident_id: str, cause: str, reason: str, by: str, now: str) -> dict[str, Any]:
        if cause not in CAUSES:
            raise IncidentError(f"cause must be one of {', '.join(CAUSES)}")
        if not reason or not reason.strip():
            raise IncidentError("an override needs a reason")
        if not by or not by.strip():
            raise IncidentError("an override needs the name of who decides")
        with self.store.tx() as db:
            row = db.execute("SELECT cause, decided_cause FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            if row is None:
                raise KeyError(incident_id)
            db.execute("UPDATE incidents SET decided_cause=?, decided_responsible=?, decided_by=?, decided_reason=?, "
                       "decided_at=?, updated_at=? WHERE id=?",
                       (cause, RESPONSIBLE_OF_CAUSE[cause], by, reason, now, now, incident_id))
            audit.append(db, now, by, incident_id, "overridden",
                         {"computed": row[0], "previous_decision": row[1], "decided": cause, "reason": reason})
        out = self.get(incident_id)
        assert out is not None
        self._notify("overridden", out)
        return out

    def acknowledge(self, incident_id: str, by: str, now: str) -> dict[str, Any]:
        if not by or not by.strip():
            raise IncidentError("an acknowledgement needs the name of who acknowledges")
        with self.store.tx() as db:
            if db.execute("SELECT 1 FROM incidents WHERE id = ?", (incident_id,)).fetchone() is None:
                raise KeyError(incident_id)
            db.execute("UPDATE incidents SET acknowledged_by=?, acknowledged_at=?, updated_at=? WHERE id=?",
                       (by, now, now, incident_id))
            audit.append(db, now, by, incident_id, "acknowledged", {})
        out = self.get(incident_id)
        assert out is not None
        return out
