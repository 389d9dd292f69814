"""Classification policy version 1, as data.

The rules are a table central IT can read; the evaluator in ``classify.py`` holds one
condition per rule id and nothing else. Windows are configurable through ``Windows``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

POLICY_VERSION = 1

INCIDENT_KINDS = ("device_error", "device_missing", "device_unstable")
CAUSES = ("device_fault", "handling_damage", "host_issue", "needs_inspection")
RESPONSIBLE = ("central_it", "unit", "none", "undetermined")


@dataclass(frozen=True)
class Rule:
    id: str
    applies_to: str  # an incident kind, or "any"
    cause: str
    responsible: str
    confidence: float
    condition: str
    explain_id: str
    explain_en: str


RULES: tuple[Rule, ...] = (
    Rule("H1", "any", "host_issue", "none", 0.7,
         "the incident is host-wide",
         "Gangguan terjadi bersamaan pada beberapa perangkat atau tepat setelah PC ruangan menyala/bangun; "
         "penyebabnya kemungkinan PC atau lingkungannya, bukan perangkat.",
         "Trouble hit several devices at once or right after the room PC started or woke; "
         "the host or its environment is the likely cause, not the device."),
    Rule("D1", "device_error", "handling_damage", "unit", 0.8,
         "an error lies 0-24 h after a handling mark on that device",
         "Perangkat mulai error dalam 24 jam setelah ada penanganan fisik (dicabut saat dipakai, dipindah port, "
         "atau dilaporkan); kerusakan karena penanganan menjadi tanggung jawab unit.",
         "The device started failing within 24 h of physical handling (pulled while in use, moved to another "
         "port, or reported); handling damage is the unit's responsibility."),
    Rule("D2", "device_error", "device_fault", "central_it", 0.8,
         "device errors, no handling mark in the 24 h before any of them",
         "Perangkat melaporkan kerusakan sendiri tanpa ada penanganan fisik sebelumnya; ini kerusakan perangkat "
         "dan menjadi tanggung jawab Pusdatin.",
         "The device reported its own failure with no handling before it; a device fault is central IT's "
         "responsibility."),
    Rule("D3", "device_error", "needs_inspection", "undetermined", 0.5,
         "link errors only, no handling mark in the 24 h before",
         "Hanya ada gangguan sambungan USB (kabel, port, atau daya); perlu diperiksa sebelum menentukan penyebab.",
         "Only USB link errors (cable, port or power); it needs inspection before a cause can be named."),
    Rule("M1", "device_missing", "handling_damage", "unit", 0.7,
         "an unexpected detach not followed by the device within 10 min; in use at detach",
         "Perangkat dicabut saat sedang dipakai dan tidak kembali dalam 10 menit; tanggung jawab unit.",
         "The device was pulled while in use and did not come back within 10 minutes; the unit is responsible."),
    Rule("M2", "device_missing", "needs_inspection", "undetermined", 0.4,
         "the same, not in use",
         "Perangkat hilang saat tidak dipakai dan tidak kembali dalam 10 menit; perlu diperiksa.",
         "The device disappeared while idle and did not come back within 10 minutes; it needs inspection."),
    Rule("U1", "device_unstable", "needs_inspection", "undetermined", 0.5,
         "3 or more detach/attach cycles of one device within 10 min, no errors",
         "Perangkat berulang kali terputus dan tersambung dalam 10 menit; kabel atau port perlu diperiksa.",
         "The device dropped off and came back repeatedly within 10 minutes; the cable or port needs inspection."),
)
RULES_BY_ID = {r.id: r for r in RULES}


@dataclass(frozen=True)
class Windows:
    """Time windows of the policy, in seconds. Defaults are PROTOCOL.md's."""

    quick_replug_s: float = 120.0
    host_wide_s: float = 60.0
    after_start_s: float = 120.0
    handling_s: float = 24 * 3600.0
    missing_s: float = 600.0
    unstable_s: float = 600.0
    unstable_cycles: int = 3
    reopen_s: float = 7 * 24 * 3600.0

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Windows:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for k, v in data.items():
            if k not in known:
                raise ValueError(f"policy.windows: unknown key {k!r} (known: {', '.join(sorted(known))})")
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"policy.windows.{k}: must be a non-negative number")
            kwargs[k] = int(v) if k == "unstable_cycles" else float(v)
        return cls(**kwargs)


def rules_for(kind: str) -> list[Rule]:
    return [r for r in RULES if r.applies_to in ("any", kind)]
