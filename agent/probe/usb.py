"""What is attached, through pyusb: identity, port, speed and kind of each device.

String reads fail often (no permission, no libusb driver on Windows, umockdev): they are
tolerated, with sysfs as a fallback on Linux, and the key falls back to ``vid:pid@port``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import usb.core
import usb.util

from common.protocol import clean_text, device_key

log = logging.getLogger(__name__)

SPEED_NAMES = {0: "unknown", 1: "low", 2: "full", 3: "high", 4: "super", 5: "super_plus"}
SYSFS_SPEED = {"1.5": "low", "12": "full", "480": "high", "5000": "super", "10000": "super_plus",
               "20000": "super_plus"}


def libusb_backend() -> Any:
    """libusb from libusb-package, falling back to the system's."""
    try:
        import libusb_package

        backend = libusb_package.get_libusb1_backend()
        if backend is not None:
            return backend
    except Exception as exc:  # the package is optional
        log.debug("libusb-package unavailable: %s", exc)
    import usb.backend.libusb1

    return usb.backend.libusb1.get_backend()


def max_speed_from_bcd(bcd_usb: int | None) -> str | None:
    if not bcd_usb:
        return None
    if bcd_usb >= 0x0320:
        return "super_plus"
    if bcd_usb >= 0x0300:
        return "super"
    if bcd_usb >= 0x0200:
        return "high"
    return "full"


def kind_from_interfaces(alts: list[tuple[int, int, list[int | tuple[int, int]]]]) -> str:
    """camera / speakerphone / speaker / microphone / other from (class, subclass, endpoints).

    Endpoints are addresses, or (address, bmAttributes). Video class 0x0E makes a camera even
    with audio. Audio streaming (class 0x01, subclass 2) data endpoints OUT mean playback, IN
    mean capture; an isochronous *feedback* endpoint (usage type 01) is neither: an
    asynchronous playback stream has an IN feedback endpoint beside its OUT data endpoint.
    """
    if any(cls == 0x0E for cls, _, _ in alts):
        return "camera"
    play = cap = False
    for cls, sub, eps in alts:
        if cls == 0x01 and sub == 2:
            for e in eps:
                ep, attrs = e if isinstance(e, tuple) else (e, 0x01)
                if (attrs & 0x03) == 0x01 and (attrs >> 4) & 0x03 == 0x01:
                    continue  # isochronous feedback
                if ep & 0x80:
                    cap = True
                else:
                    play = True
    if play and cap:
        return "speakerphone"
    if play:
        return "speaker"
    if cap:
        return "microphone"
    return "other"


def port_path(bus: int | None, ports: tuple[int, ...] | None) -> str | None:
    if bus is None or not ports:
        return None
    return f"{bus}-{'.'.join(str(p) for p in ports)}"


def _langid(dev: Any, failures: list[int]) -> int | None:
    """The first language id. pyusb's ``dev.langids`` swallows the USBError that tells a
    hung (-110) or vanished (-19) device from one without strings, so ask directly."""
    try:
        langids = usb.util.get_langids(dev)
    except usb.core.USBError as exc:
        failures.append(-(exc.errno or 0))
        return None
    except (ValueError, NotImplementedError, OSError):
        return None
    return langids[0] if langids else None


def _string(dev: Any, index: int, langid: int | None, failures: list[int]) -> str | None:
    if not index or langid is None:
        return None
    try:
        s = usb.util.get_string(dev, index, langid)
    except usb.core.USBError as exc:
        failures.append(-(exc.errno or 0))
        return None
    except (ValueError, NotImplementedError, OSError):
        return None
    return clean_text(s)


def _sysfs(sysfs_root: str, port: str, attr: str) -> str | None:
    try:
        with open(os.path.join(sysfs_root, "bus/usb/devices", port, attr), encoding="utf-8", errors="replace") as fh:
            return clean_text(fh.read())
    except OSError:
        return None


def describe(dev: Any, sysfs_root: str = "/sys", failures: list[int] | None = None) -> dict[str, Any] | None:
    """One pyusb device -> the protocol's device object (None for hubs)."""
    if dev.bDeviceClass == 0x09:
        return None
    alts: list[tuple[int, int, list[int | tuple[int, int]]]] = []
    try:
        for cfg in dev:
            for intf in cfg:
                if intf.bInterfaceClass == 0x09:
                    return None
                alts.append((intf.bInterfaceClass, intf.bInterfaceSubClass,
                             [(ep.bEndpointAddress, ep.bmAttributes) for ep in intf]))
    except (usb.core.USBError, NotImplementedError) as exc:
        log.debug("cannot read configuration of %04x:%04x: %s", dev.idVendor, dev.idProduct, exc)
    ports = tuple(dev.port_numbers) if dev.port_numbers else None
    port = port_path(dev.bus, ports) or f"{dev.bus}-0.{dev.address}"
    vid, pid = f"{dev.idVendor:04x}", f"{dev.idProduct:04x}"
    fails = failures if failures is not None else []
    lang = _langid(dev, fails) if (dev.iSerialNumber or dev.iManufacturer or dev.iProduct) else None
    serial = _string(dev, dev.iSerialNumber, lang, fails) or _sysfs(sysfs_root, port, "serial")
    vendor = _string(dev, dev.iManufacturer, lang, fails) or _sysfs(sysfs_root, port, "manufacturer")
    product = _string(dev, dev.iProduct, lang, fails) or _sysfs(sysfs_root, port, "product")
    speed = SPEED_NAMES.get(dev.speed or 0, "unknown")
    if speed == "unknown":
        speed = SYSFS_SPEED.get(_sysfs(sysfs_root, port, "speed") or "", "unknown")
    bcd = dev.bcdDevice or 0
    return {
        "key": device_key(vid, pid, serial, port),
        "vid": vid,
        "pid": pid,
        "serial": serial,
        "kind": kind_from_interfaces(alts),
        "vendor": vendor,
        "product": product,
        "port": port,
        "speed": speed,
        "max_speed": max_speed_from_bcd(dev.bcdUSB),
        "firmware": f"{bcd >> 8:x}.{bcd & 0xFF:02x}",
    }


class Prober:
    """Probes a bus repeatedly; remembers identities so a device that stops answering
    string requests keeps its key, and reports which ports failed and how (negative errno)."""

    def __init__(self, backend: Any, sysfs_root: str = "/sys") -> None:
        self.backend = backend
        self.sysfs_root = sysfs_root
        self._known: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._key_port: dict[str, str] = {}  # key -> the port it was last seen on (twins with one serial)
        self._by_port: set[tuple[str, str, str]] = set()  # (port, vid, pid) keyed by port: a twin's
        self.failures: dict[str, int] = {}

    def probe(self) -> list[dict[str, Any]]:
        out = []
        self.failures = {}
        for dev in usb.core.find(find_all=True, backend=self.backend) or []:
            fails: list[int] = []
            try:
                d = describe(dev, self.sysfs_root, fails)
            except usb.core.USBError as exc:
                log.debug("device vanished while probing: %s", exc)
                continue
            if d is None:
                continue
            ident = (d["port"], d["vid"], d["pid"])
            known = self._known.get(ident)
            if fails:
                self.failures[d["port"]] = fails[0]
                if known is not None:  # keep the identity read when it still answered
                    d = {**d, **{k: known[k] for k in ("key", "serial", "vendor", "product")}}
            elif d["serial"] or known is None:
                self._known[ident] = d
            out.append(d)
        return self._unique_keys(out)

    def _unique_keys(self, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Devices of one model reporting one serial (cheap ones often do): the one on the port that key was
        last seen on keeps it, the others are keyed ``vid:pid@port`` as devices without a serial, and keep
        that key for as long as they stay on that port — so neither looks like the other moving ports, and
        no key changes under a device that stays put."""
        by_key: dict[str, list[dict[str, Any]]] = {}
        for d in devices:
            by_key.setdefault(d["key"], []).append(d)
        out = []
        for d in devices:
            slot = (d["port"], d["vid"], d["pid"])
            twins = by_key[d["key"]]
            if slot not in self._by_port and len(twins) > 1:
                last = self._key_port.get(d["key"])
                keeper = next((t for t in twins if t["port"] == last), min(twins, key=lambda t: t["port"]))
                if d is not keeper:
                    self._by_port.add(slot)
            if slot in self._by_port:
                d = {**d, "key": device_key(d["vid"], d["pid"], None, d["port"])}
            out.append(d)
        self._by_port &= {(d["port"], d["vid"], d["pid"]) for d in devices}  # gone from its port: forgotten
        self._key_port.update({d["key"]: d["port"] for d in out})
        return out


def probe(backend: Any, sysfs_root: str = "/sys") -> list[dict[str, Any]]:
    """Every non-hub device on the bus, described (one-shot)."""
    return Prober(backend, sysfs_root).probe()
