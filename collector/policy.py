"""Classification policy version 1.1, as data.

The rules are a table central IT can read: each row holds its condition (as a sentence and as
the predicate the evaluator runs), its cause, who is responsible and what a PIC is told. The
evaluator in ``classify.py`` finds the facts (timeline, marks, windows) and runs the first row
whose predicate holds. Every sentence a person reads about a cause is in this file.
Windows are configurable through ``Windows``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

POLICY_VERSION = "1.1"

INCIDENT_KINDS = ("device_error", "device_missing", "device_unstable")
CAUSES = ("device_fault", "handling_damage", "host_issue", "needs_inspection")
RESPONSIBLE = ("central_it", "unit", "none", "undetermined")
RESPONSIBLE_OF_CAUSE = {"device_fault": "central_it", "handling_damage": "unit", "host_issue": "none",
                        "needs_inspection": "undetermined"}


class Facts(Protocol):
    """What a rule's predicate may ask about an incident (answered by the evaluator)."""

    def host_wide(self, inc: Any) -> bool: ...
    def relied_mark(self, inc: Any) -> Any: ...  # the handling mark D1 relies on, or None
    def families(self, inc: Any) -> frozenset[str]: ...  # error families of its trouble
    def in_use_at_latest_detach(self, inc: Any) -> bool: ...


Predicate = Callable[[Any, Facts], bool]


@dataclass(frozen=True)
class Rule:
    id: str
    applies_to: str  # an incident kind, or "any"
    cause: str
    responsible: str
    confidence: float
    condition: str
    holds: Predicate
    explain_id: str
    explain_en: str


RULES: tuple[Rule, ...] = (
    Rule("H1", "any", "host_issue", "none", 0.7,
         "the incident is host-wide",
         lambda inc, f: f.host_wide(inc),
         "Gangguan terjadi bersamaan pada beberapa perangkat atau tepat setelah PC ruangan menyala/bangun; "
         "penyebabnya kemungkinan PC atau lingkungannya, bukan perangkat.",
         "Trouble hit several devices at once or right after the room PC started or woke; "
         "the host or its environment is the likely cause, not the device."),
    Rule("D1", "device_error", "handling_damage", "unit", 0.8,
         "an error lies 0-24 h after a handling mark on that device",
         lambda inc, f: f.relied_mark(inc) is not None,
         "Perangkat mulai error dalam 24 jam setelah ada penanganan fisik (dicabut saat dipakai, dipindah port, "
         "atau dilaporkan); kerusakan karena penanganan menjadi tanggung jawab unit.",
         "The device started failing within 24 h of physical handling (pulled while in use, moved to another "
         "port, or reported); handling damage is the unit's responsibility."),
    Rule("D2", "device_error", "device_fault", "central_it", 0.8,
         "at least one device-family error, no handling mark in the 24 h before any of its errors",
         lambda inc, f: "device" in f.families(inc) and f.relied_mark(inc) is None,
         "Perangkat melaporkan kerusakan sendiri tanpa ada penanganan fisik sebelumnya; ini kerusakan perangkat "
         "dan menjadi tanggung jawab Pusdatin.",
         "The device reported its own failure with no handling before it; a device fault is central IT's "
         "responsibility."),
    Rule("D3", "device_error", "needs_inspection", "undetermined", 0.5,
         "link errors only, no handling mark in the 24 h before",
         lambda inc, f: f.families(inc) <= {"link"} and f.relied_mark(inc) is None,
         "Hanya ada gangguan sambungan USB (kabel, port, atau daya); perlu diperiksa sebelum menentukan penyebab.",
         "Only USB link errors (cable, port or power); it needs inspection before a cause can be named."),
    Rule("M1", "device_missing", "handling_damage", "unit", 0.7,
         "an unexpected detach not followed by the device within 10 min; in use at (its latest) detach",
         lambda inc, f: f.in_use_at_latest_detach(inc),
         "Perangkat dicabut saat sedang dipakai dan tidak kembali dalam 10 menit; tanggung jawab unit.",
         "The device was pulled while in use and did not come back within 10 minutes; the unit is responsible."),
    Rule("M2", "device_missing", "needs_inspection", "undetermined", 0.4,
         "an unexpected detach not followed by the device within 10 min; not in use at (its latest) detach",
         lambda inc, f: not f.in_use_at_latest_detach(inc),
         "Perangkat hilang saat tidak dipakai dan tidak kembali dalam 10 menit; perlu diperiksa.",
         "The device disappeared while idle and did not come back within 10 minutes; it needs inspection."),
    Rule("U1", "device_unstable", "needs_inspection", "undetermined", 0.5,
         "3 or more detach/attach cycles of one device within 10 min, no errors",
         lambda inc, f: True,  # the evaluator opens device_unstable only where this holds
         "Perangkat berulang kali terputus dan tersambung dalam 10 menit; kabel atau port perlu diperiksa.",
         "The device dropped off and came back repeatedly within 10 minutes; the cable or port needs inspection."),
)
RULES_BY_ID = {r.id: r for r in RULES}

# What people read: names of causes, responsible parties, device kinds and incident kinds.
CAUSE_NAMES = {
    "id": {"device_fault": "Kerusakan perangkat", "handling_damage": "Kerusakan karena penanganan",
           "host_issue": "Masalah PC/lingkungan", "needs_inspection": "Perlu diperiksa"},
    "en": {"device_fault": "Device fault", "handling_damage": "Handling damage", "host_issue": "Host issue",
           "needs_inspection": "Needs inspection"},
}
RESPONSIBLE_NAMES = {
    "id": {"central_it": "Pusdatin", "unit": "Unit peminjam", "none": "Tidak ada", "undetermined": "Belum ditentukan"},
    "en": {"central_it": "Central IT", "unit": "Borrowing unit", "none": "Nobody", "undetermined": "Undetermined"},
}
DEVICE_KIND_NAMES = {
    "id": {"camera": "Kamera", "speakerphone": "Speakerphone", "speaker": "Speaker", "microphone": "Mikrofon",
           None: "Perangkat"},
    "en": {"camera": "Camera", "speakerphone": "Speakerphone", "speaker": "Speaker", "microphone": "Microphone",
           None: "Device"},
}
INCIDENT_KIND_NAMES = {
    "id": {"device_error": "Error perangkat", "device_missing": "Perangkat hilang", "device_unstable": "Tidak stabil"},
    "en": {"device_error": "Device error", "device_missing": "Device missing", "device_unstable": "Unstable"},
}
INCIDENT_PHRASES = {
    "id": {"device_error": "mengalami error", "device_missing": "hilang dari PC ruangan",
           "device_unstable": "berulang kali terputus"},
    "en": {"device_error": "reported errors", "device_missing": "went missing from the room PC",
           "device_unstable": "kept dropping off"},
}


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
