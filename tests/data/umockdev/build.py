"""Writes host.umockdev, camera.umockdev and speakerphone.umockdev: sysfs/udev descriptions of a UVC camera
(with a microphone function) and a USB speakerphone, in umockdev's device format.

No hardware was recorded: the descriptors below are written field by field after the USB
2.0, UVC 1.1 and USB Audio 1.0 specifications, so a reader can check each byte. Run
``python build.py [OUT_DIR]`` to regenerate the files.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).parent


def device(vid: int, pid: int, bcd_usb: int, cls: int, sub: int, proto: int, bcd_dev: int) -> bytes:
    return struct.pack("<BBHBBBBHHHBBBB", 18, 1, bcd_usb, cls, sub, proto, 64, vid, pid, bcd_dev, 1, 2, 3, 1)


def config(body: bytes, n_interfaces: int, max_power_2ma: int) -> bytes:
    return struct.pack("<BBHBBBBB", 9, 2, 9 + len(body), n_interfaces, 1, 0, 0x80, max_power_2ma) + body


def iad(first: int, count: int, cls: int, sub: int) -> bytes:
    return struct.pack("<BBBBBBBB", 8, 0x0B, first, count, cls, sub, 0, 0)


def interface(num: int, alt: int, n_ep: int, cls: int, sub: int) -> bytes:
    return struct.pack("<BBBBBBBBB", 9, 4, num, alt, n_ep, cls, sub, 0, 0)


def endpoint(addr: int, attrs: int, size: int, interval: int, audio: bool = False) -> bytes:
    if audio:  # USB Audio 1.0 endpoints are 9 bytes (bRefresh, bSynchAddress)
        return struct.pack("<BBBBHBBB", 9, 5, addr, attrs, size, interval, 0, 0)
    return struct.pack("<BBBBHB", 7, 5, addr, attrs, size, interval)


VIDEO, AUDIO, HID = 0x0E, 0x01, 0x03
ISO, INTR = 0x05, 0x03

CAMERA = device(0x046D, 0x0843, 0x0200, 0xEF, 0x02, 0x01, 0x0013) + config(
    iad(0, 2, VIDEO, 0x03)
    + interface(0, 0, 1, VIDEO, 1) + endpoint(0x83, INTR, 16, 6)            # video control
    + interface(1, 0, 0, VIDEO, 2)                                          # video streaming, idle
    + interface(1, 1, 1, VIDEO, 2) + endpoint(0x81, ISO, 0x1400, 1)         # video streaming, 3x1024
    + iad(2, 2, AUDIO, 0x02)
    + interface(2, 0, 0, AUDIO, 1)                                          # audio control
    + interface(3, 0, 0, AUDIO, 2)                                          # microphone, idle
    + interface(3, 1, 1, AUDIO, 2) + endpoint(0x82, ISO, 0x44, 4, audio=True),
    4, 250)

SPEAKERPHONE = device(0x0B0E, 0x2456, 0x0110, 0x00, 0x00, 0x00, 0x0108) + config(
    interface(0, 0, 0, AUDIO, 1)                                            # audio control
    + interface(1, 0, 0, AUDIO, 2)                                          # playback, idle
    + interface(1, 1, 1, AUDIO, 2) + endpoint(0x01, 0x09, 0x60, 1, audio=True)  # playback, adaptive OUT
    + interface(2, 0, 0, AUDIO, 2)                                          # capture, idle
    + interface(2, 1, 1, AUDIO, 2) + endpoint(0x82, 0x05, 0x20, 1, audio=True)  # capture, async IN
    + interface(3, 0, 1, HID, 0) + endpoint(0x83, INTR, 16, 10),            # buttons (mute, volume)
    4, 50)

ROOT_HUB = device(0x1D6B, 0x0002, 0x0200, 0x09, 0x00, 0x01, 0x0601) + config(
    interface(0, 0, 1, 0x09, 0) + endpoint(0x81, INTR, 4, 12), 1, 0)


def node(path: str, busnum: int, devnum: int, devpath: str, desc: bytes, attrs: dict[str, str],
         props: dict[str, str]) -> str:
    hexd = desc.hex().upper()
    vid, pid = struct.unpack_from("<HH", desc, 8)
    lines = [f"P: {path}", f"N: bus/usb/{busnum:03d}/{devnum:03d}={hexd}",
             f"E: BUSNUM={busnum:03d}", f"E: DEVNAME=/dev/bus/usb/{busnum:03d}/{devnum:03d}",
             f"E: DEVNUM={devnum:03d}", "E: DEVTYPE=usb_device", "E: DRIVER=usb", "E: SUBSYSTEM=usb",
             f"E: ID_VENDOR_ID={vid:04x}", f"E: ID_MODEL_ID={pid:04x}", f"E: PRODUCT={vid:x}/{pid:x}/0"]
    lines += [f"E: {k}={v}" for k, v in props.items()]
    base = {"busnum": f"{busnum}", "devnum": f"{devnum}", "devpath": devpath, "idVendor": f"{vid:04x}",
            "idProduct": f"{pid:04x}", "bNumConfigurations": "1", "bConfigurationValue": "1",
            "bMaxPacketSize0": "64", "authorized": "1"}
    lines += [f"A: {k}={v}" for k, v in {**base, **attrs}.items()]
    lines.append(f"H: descriptors={hexd}")
    return "\n".join(lines) + "\n"


HOST = "/devices/pci0000:00/0000:00:14.0"
PCI = (f"P: {HOST}\nE: DRIVER=xhci_hcd\nE: PCI_CLASS=C0330\nE: SUBSYSTEM=pci\n"
       "A: class=0x0c0330\nA: vendor=0x8086\nA: device=0xa36d\n")


def root() -> str:
    return node(f"{HOST}/usb1", 1, 1, "0", ROOT_HUB,
                {"bDeviceClass": "09", "speed": "480", "version": " 2.00", "maxchild": "4",
                 "manufacturer": "Linux 6.1.0-28-amd64 xhci-hcd", "product": "xHCI Host Controller",
                 "serial": "0000:00:14.0"}, {"ID_USB_INTERFACES": ":090000:"})


def main(out: Path = HERE) -> None:
    cam = node(f"{HOST}/usb1/1-2", 1, 4, "2", CAMERA,
               {"bDeviceClass": "ef", "bcdDevice": "0013", "speed": "480", "version": " 2.00",
                "manufacturer": "Logitech", "product": "Logitech Webcam C930e", "serial": "A1B2C3D4",
                "bMaxPower": "500mA", "removable": "removable"},
               {"ID_SERIAL_SHORT": "A1B2C3D4", "ID_USB_INTERFACES": ":0e0100:0e0200:010100:010200:"})
    spk = node(f"{HOST}/usb1/1-3", 1, 5, "3", SPEAKERPHONE,
               {"bDeviceClass": "00", "bcdDevice": "0108", "speed": "12", "version": " 1.10",
                "manufacturer": "Jabra", "product": "Jabra SPEAK 810", "serial": "0123456789AB",
                "bMaxPower": "100mA", "removable": "removable"},
               {"ID_SERIAL_SHORT": "0123456789AB", "ID_USB_INTERFACES": ":010100:010200:030000:"})
    (out / "camera.umockdev").write_text(cam)
    (out / "speakerphone.umockdev").write_text(spk)
    (out / "host.umockdev").write_text(root() + "\n" + PCI)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
