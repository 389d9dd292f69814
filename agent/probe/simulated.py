"""A simulated USB bus at pyusb's own backend boundary.

``usb.core.find(backend=SimulatedBackend(path))`` runs pyusb's real code (descriptors,
alternate settings, string descriptors over control transfers) against devices listed in
a JSON file. The file is re-read when it changes: removing an entry is an unplug,
changing ``port`` a move. A half-written or invalid file is reported once and the last
good state kept. Format: docs/simulated-bus.md.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import usb.backend
import usb.core

log = logging.getLogger(__name__)

SPEED_CODES = {"unknown": 0, "low": 1, "full": 2, "high": 3, "super": 4, "super_plus": 5}
# bcdUSB by the best speed: USB 1.1 covers low and full alike (both read back as full, as on real hardware)
BCD_USB = {"low": 0x0110, "full": 0x0110, "high": 0x0200, "super": 0x0300, "super_plus": 0x0320, "unknown": 0}
KINDS = ("camera", "speakerphone", "speaker", "microphone", "other")
SELF_TEST_MODES = {"video": ("live", "frozen", "no_frames"), "audio": ("live", "silent", "none")}


class BusFileError(ValueError):
    pass


@dataclass
class _Desc:
    """A descriptor: attributes as pyusb reads them."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _hex4(v: object, name: str, i: int) -> int:
    if not isinstance(v, str) or len(v) != 4:
        raise BusFileError(f"devices[{i}].{name} must be 4 hex digits")
    try:
        return int(v, 16)
    except ValueError:
        raise BusFileError(f"devices[{i}].{name} must be 4 hex digits") from None


def parse_bus(data: object) -> list[dict[str, Any]]:
    """Validate a bus file's content; returns normalised device entries."""
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise BusFileError("the bus file must be an object with a 'devices' array")
    out = []
    for i, d in enumerate(data["devices"]):
        if not isinstance(d, dict):
            raise BusFileError(f"devices[{i}] must be an object")
        e = dict(d)
        e["_vid"], e["_pid"] = _hex4(d.get("vid"), "vid", i), _hex4(d.get("pid"), "pid", i)
        port = d.get("port")
        if not isinstance(port, str) or "-" not in port:
            raise BusFileError(f"devices[{i}].port must look like '1-2.3'")
        bus, _, path = port.partition("-")
        try:
            e["_bus"], e["_ports"] = int(bus), tuple(int(p) for p in path.split("."))
        except ValueError:
            raise BusFileError(f"devices[{i}].port must look like '1-2.3'") from None
        if d.get("kind", "other") not in KINDS:
            raise BusFileError(f"devices[{i}].kind must be one of {', '.join(KINDS)}")
        for name in ("speed", "max_speed"):
            if d.get(name, "high") not in SPEED_CODES:
                raise BusFileError(f"devices[{i}].{name} must be one of {', '.join(SPEED_CODES)}")
        if d.get("serial") is not None and not isinstance(d.get("serial"), str):
            raise BusFileError(f"devices[{i}].serial must be a string or null")
        errs = d.get("errors", [])
        if not isinstance(errs, list) or not all(isinstance(x, dict) and isinstance(x.get("code"), str) for x in errs):
            raise BusFileError(f"devices[{i}].errors must be an array of objects with a string code")
        st = d.get("self_test", {})
        if not isinstance(st, dict) or any(k not in SELF_TEST_MODES or v not in SELF_TEST_MODES[k]
                                           for k, v in st.items()):
            raise BusFileError(f"devices[{i}].self_test must be an object like "
                               f'{{"video": "live" | "frozen" | "no_frames", "audio": "live" | "silent" | "none"}}')
        out.append(e)
    return out


class BusFile:
    """The JSON file, re-read on change; keeps the last good content."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self.devices: list[dict[str, Any]] = []
        self.last_error: str | None = None
        self.reload()

    def reload(self) -> bool:
        """Re-read if the file changed; True when the device list was replaced."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._report(f"cannot read simulated bus {self.path}: {exc.strerror}")
            return False
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            with open(self.path, encoding="utf-8") as fh:
                devices = parse_bus(json.load(fh))
        except (OSError, ValueError) as exc:
            self._report(f"simulated bus {self.path} is invalid, keeping the last good state: {exc}")
            return False
        self.devices, self.last_error = devices, None
        return True

    def _report(self, msg: str) -> None:
        if msg != self.last_error:
            log.warning(msg)
            self.last_error = msg


def _interfaces(kind: str) -> list[list[dict[str, Any]]]:
    """Interfaces (each a list of alternate settings) a device of this kind presents."""
    vc = [{"cls": 0x0E, "sub": 1, "eps": [0x83]}]
    vs = [{"cls": 0x0E, "sub": 2, "eps": []}, {"cls": 0x0E, "sub": 2, "eps": [0x81]}]
    ac = [{"cls": 0x01, "sub": 1, "eps": []}]
    play = [{"cls": 0x01, "sub": 2, "eps": []}, {"cls": 0x01, "sub": 2, "eps": [0x01]}]
    cap = [{"cls": 0x01, "sub": 2, "eps": []}, {"cls": 0x01, "sub": 2, "eps": [0x82]}]
    return {
        "camera": [vc, vs, ac, cap],
        "speakerphone": [ac, play, cap, [{"cls": 0x03, "sub": 0, "eps": [0x84]}]],
        "speaker": [ac, play],
        "microphone": [ac, cap],
    }.get(kind, [[{"cls": 0xFF, "sub": 0, "eps": [0x81]}]])


class SimulatedBackend(usb.backend.IBackend):
    """pyusb backend over a BusFile. Device handles are the entry dicts."""

    def __init__(self, bus: BusFile) -> None:
        self.bus = bus

    def enumerate_devices(self):
        self.bus.reload()
        return list(self.bus.devices)

    def _alive(self, dev: dict[str, Any]) -> None:
        if not any(d is dev for d in self.bus.devices):
            raise usb.core.USBError("No such device (it may have been disconnected)", errno=errno.ENODEV)
        if dev.get("unresponsive"):
            raise usb.core.USBTimeoutError("Operation timed out", errno=errno.ETIMEDOUT)

    def get_device_descriptor(self, dev):
        strings = 1 if dev.get("vendor") else 0, 2 if dev.get("product") else 0, 3 if dev.get("serial") else 0
        fw = str(dev.get("firmware", "1.00"))
        major, _, minor = fw.partition(".")
        try:  # binary-coded decimal, as the device reports it: "10.00" is 0x1000
            bcd_dev = (int((major or "0")[-2:], 16) << 8) | int((minor or "0")[:2].ljust(2, "0"), 16)
        except ValueError:
            bcd_dev = 0x0100
        speed = dev.get("speed", "high")
        best = dev.get("max_speed", speed if speed in ("super", "super_plus") else "high")
        return _Desc(
            bLength=18, bDescriptorType=1, bcdUSB=BCD_USB.get(best, 0x0200),
            bDeviceClass=0xEF, bDeviceSubClass=2, bDeviceProtocol=1, bMaxPacketSize0=64,
            idVendor=dev["_vid"], idProduct=dev["_pid"], bcdDevice=bcd_dev,
            iManufacturer=strings[0], iProduct=strings[1], iSerialNumber=strings[2], bNumConfigurations=1,
            address=dev.get("address", 2), bus=dev["_bus"], port_number=dev["_ports"][-1],
            port_numbers=dev["_ports"], speed=SPEED_CODES[dev.get("speed", "high")],
        )

    def get_configuration_descriptor(self, dev, config):
        if config != 0:
            raise IndexError("configuration index out of range")
        n = len(_interfaces(dev.get("kind", "other")))
        return _Desc(bLength=9, bDescriptorType=2, wTotalLength=0, bNumInterfaces=n, bConfigurationValue=1,
                     iConfiguration=0, bmAttributes=0x80, bMaxPower=250, extra_descriptors=[])

    def get_interface_descriptor(self, dev, intf, alt, config):
        ifs = _interfaces(dev.get("kind", "other"))
        if config != 0 or intf >= len(ifs) or alt >= len(ifs[intf]):
            raise IndexError("interface or alternate setting out of range")
        a = ifs[intf][alt]
        return _Desc(bLength=9, bDescriptorType=4, bInterfaceNumber=intf, bAlternateSetting=alt,
                     bNumEndpoints=len(a["eps"]), bInterfaceClass=a["cls"], bInterfaceSubClass=a["sub"],
                     bInterfaceProtocol=0, iInterface=0, extra_descriptors=[])

    def get_endpoint_descriptor(self, dev, ep, intf, alt, config):
        a = _interfaces(dev.get("kind", "other"))[intf][alt]
        if ep >= len(a["eps"]):
            raise IndexError("endpoint out of range")
        return _Desc(bLength=7, bDescriptorType=5, bEndpointAddress=a["eps"][ep], bmAttributes=1,
                     wMaxPacketSize=512, bInterval=1, bRefresh=0, bSynchAddress=0, extra_descriptors=[])

    def open_device(self, dev):
        self._alive(dev)
        return dev

    def close_device(self, dev_handle):
        return None

    def get_configuration(self, dev_handle):
        return 1

    def set_configuration(self, dev_handle, config_value):
        return None

    def ctrl_transfer(self, dev_handle, bmRequestType, bRequest, wValue, wIndex, data, timeout):
        self._alive(dev_handle)
        if bmRequestType != 0x80 or bRequest != 6 or (wValue >> 8) != 3:
            raise usb.core.USBError("Pipe error", errno=errno.EPIPE)
        index = wValue & 0xFF
        if index == 0:
            raw = bytes([4, 3, 0x09, 0x04])
        else:
            text = {1: dev_handle.get("vendor"), 2: dev_handle.get("product"), 3: dev_handle.get("serial")}.get(index)
            if not text:
                raise usb.core.USBError("Pipe error", errno=errno.EPIPE)
            body = str(text).encode("utf-16-le")[:252]
            raw = bytes([len(body) + 2, 3]) + body
        n = min(len(raw), len(data))
        data[:n] = array.array("B", raw[:n])
        return n

    def get_parent(self, dev):
        return None
