"""Linux kernel log lines -> protocol error codes, attributed to a USB port.

Accepts ``/dev/kmsg`` records (``6,1234,5678,-;usb 1-2: ...``), ``dmesg`` output
(``[ 12.345] usb 1-2: ...``) and journal lines (``... kernel: usb 1-2: ...``). Continuation
lines of ``/dev/kmsg`` (starting with a space) carry no message and are ignored.
Besides error codes it reports ``usb.disconnect`` and ``usb.new_device``, which the watcher
uses to correlate, and which ``pantau-agent signals`` prints.

Older kernels name less: ``hub 1-0:1.0: over-current condition on port 3`` names the hub and a
port number (the port path is worked out here: ``1-3``), and snd-usb-audio before 3.16 printed
``4:1:1: usb_set_interface failed`` (USB device number, interface, alternate setting) or
``cannot submit urb (err = -18)`` with no device at all. Those signals carry ``devnum``/``iface``
and no port; ``agent.signals.resolve`` finds the port in sysfs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# A USB device name in the kernel: "1-2", "1-2.3.1"; root hubs are "usb1".
_DEV = r"(?P<port>\d+-\d+(?:\.\d+)*)"


@dataclass(frozen=True, slots=True)
class Signal:
    line_no: int
    port: str | None
    code: str
    errno: int | None
    message: str
    devnum: int | None = None  # USB device number, where a line names that instead of a port
    iface: int | None = None  # interface number, likewise

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"line_no": self.line_no, "port": self.port, "code": self.code,
                                  "errno": self.errno}
        if self.devnum is not None:
            out["devnum"] = self.devnum
        return out


def _hubport(m: re.Match[str]) -> str:
    """``usb2-port4`` -> ``2-4``; ``1-2-port3`` -> ``1-2.3``."""
    hub, port = m.group("hub"), m.group("hport")
    if hub.startswith("usb"):
        return f"{hub[3:]}-{port}"
    return f"{hub}.{port}"


_HUBPORT = r"usb (?P<hub>usb\d+|\d+-\d+(?:\.\d+)*)-port(?P<hport>\d+)"
# the older form names the hub's interface and a port number: "hub 1-0:1.0: ... port 3"
_OLDHUB = r"hub (?P<hubdev>\d+-\d+(?:\.\d+)*):\d+\.\d+: "


def _hubdev_port(hubdev: str, port: str) -> str:
    """``1-0`` (bus 1's root hub) + 3 -> ``1-3``; ``2-1`` + 5 -> ``2-1.5``."""
    bus, _, path = hubdev.partition("-")
    return f"{bus}-{port}" if path == "0" else f"{hubdev}.{port}"


_ALSA = r"^(?:ALSA [\w.]+:\d+:? )?"  # CONFIG_SND_VERBOSE_PRINTK's "ALSA pcm.c:250 "

# (pattern, code, errno group or fixed errno). Order matters: first match wins.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"usb {_DEV}: USB disconnect, (?:device number|address) \d+"), "usb.disconnect"),
    (re.compile(rf"usb {_DEV}: new (?:[\w ]+?)(?:-speed)? USB device (?:number \d+|using \S+ and address \d+)"),
     "usb.new_device"),
    (re.compile(rf"usb {_DEV}: reset [\w ]*?(?:-speed)? ?USB device number \d+"), "usb.reset"),
    (re.compile(rf"{_HUBPORT}: over-current (?:condition|change)"), "usb.over_current"),
    (re.compile(rf"{_OLDHUB}over-current (?:condition|change) on port (?P<hport>\d+)"), "usb.over_current"),
    (re.compile(rf"{_OLDHUB}port (?P<hport>\d+) disabled by hub \(EMI\?\)"), "usb.protocol_error"),
    (re.compile(rf"{_OLDHUB}Cannot enable port (?P<hport>\d+)"), "usb.enumeration_failed"),
    (re.compile(rf"usb {_DEV}: not running at top speed"), "usb.speed_degraded"),
    (re.compile(rf"{_HUBPORT}: unable to enumerate USB device"), "usb.enumeration_failed"),
    (re.compile(rf"{_HUBPORT}: (?:attempt power cycle|Cannot enable|connect-debounce failed)"),
     "usb.enumeration_failed"),
    (re.compile(rf"{_HUBPORT}: disabled by hub \(EMI\?\)"), "usb.protocol_error"),
    (re.compile(rf"usb {_DEV}: device descriptor read/\w+, error (?P<errno>-\d+)"), "usb.enumeration_failed"),
    (re.compile(rf"usb {_DEV}: device not accepting address \d+, error (?P<errno>-\d+)"), "usb.enumeration_failed"),
    (re.compile(rf"usb {_DEV}: (?:Device not responding to setup address|"
                rf"Cannot enable\. Maybe the USB cable is bad\?|unable to read config index \d+ descriptor/\w+"
                rf"|can't read configurations, error (?P<errno>-\d+))"), "usb.enumeration_failed"),
    # ": -32 (exp. 26)" is an error; ": 1 (exp. 34)" a short answer (no errno)
    (re.compile(rf"uvcvideo {_DEV}:[\d.]+: Failed to (?:query|set) .*?control.*?: (?:(?P<errno>-\d+)|\d+ \(exp)"),
     "video.control_error"),
    # Debian 6.1 logs uvcvideo's errors under the USB device's own name
    (re.compile(rf"usb {_DEV}: Failed to (?:query|set) .*?UVC .*?control.*?: (?:(?P<errno>-\d+)|\d+ \(exp)"),
     "video.control_error"),
    (re.compile(rf"usb {_DEV}: Failed to (?:initialize the device|resubmit video URB|submit URB(?: \d+)?"
                r"|start[\w ]*)(?: \((?P<errno>-\d+)\))?"), "video.stream_error"),
    (re.compile(r"uvcvideo: Failed to (?:query|set) .*?control.*?: (?:(?P<errno>-\d+)|\d+ \(exp)"),
     "video.control_error"),
    (re.compile(rf"uvcvideo {_DEV}:[\d.]+: Non-zero status \((?P<errno>-(?:71|84|75))\) in"), "usb.protocol_error"),
    (re.compile(r"uvcvideo: Non-zero status \((?P<errno>-(?:71|84|75))\) in"), "usb.protocol_error"),
    # "Failed to submit URB 0 (-28)." / "Failed to resubmit video URB (-19).": the errno closes the line
    (re.compile(rf"uvcvideo {_DEV}:[\d.]+: (?:Non-zero status \((?P<errno>-\d+)\) in|Failed to (?:resubmit|submit) "
                r"(?:video )?URB(?: \d+)?(?: \((?P<errno3>-\d+)\))?|Failed to initialize the device"
                r"(?: \((?P<errno2>-\d+)\))?|Failed to start|Failed to set up)"), "video.stream_error"),
    (re.compile(r"uvcvideo: (?:Non-zero status \((?P<errno>-\d+)\) in|Failed to (?:resubmit|submit) (?:video )?URB"
                r"(?: \d+)?(?: \((?P<errno3>-\d+)\))?|Failed to initialize the device(?: \((?P<errno2>-\d+)\))?)"),
     "video.stream_error"),
    (re.compile(rf"usb {_DEV}: [\d:]+ ?usb_set_interface failed \((?P<errno>-\d+)\)"), "audio.stream_error"),
    # snd-usb-audio before 3.16: "<devnum>:<iface>:<altsetting>: ...", or no device at all
    (re.compile(rf"{_ALSA}(?P<devnum>\d+):(?P<iface>\d+):\d+: usb_set_interface failed(?: \((?P<errno>-\d+)\))?"),
     "audio.stream_error"),
    (re.compile(rf"{_ALSA}cannot submit (?:(?:data|sync)pipe for )?urb(?: \d+)?"
                r"(?: \(err = (?P<errno>-\d+)\)|, error (?P<errno2>-\d+))"), "audio.stream_error"),
    (re.compile(rf"usb {_DEV}: (?:\d+:\d+: )?cannot submit urb(?:.*?(?:err(?:or)?\s*=?\s*)(?P<errno>-\d+))?"),
     "audio.stream_error"),
    (re.compile(rf"usb {_DEV}: (?:\d+:\d+: )?cannot (?:get|set) (?:freq|min/max|ctl value)"
                r"(?:.*?(?:error|err =|ret =)?\s*\(?(?P<errno>-\d+)\)?\s*$)?"), "audio.stream_error"),
    (re.compile(rf"usb {_DEV}: .*?(?:timeout|timed out).*?(?P<errno>-110)"), "usb.timeout"),
    (re.compile(rf"usb {_DEV}: can't set config #\d+, error (?P<errno>-\d+)"), "usb.timeout"),
    (re.compile(rf"usb {_DEV}: .*?(?:error|status) (?P<errno>-(?:71|84|75))\b"), "usb.protocol_error"),
]

_PREFIXES = [
    re.compile(r"^\s*<\d+>"),  # syslog priority
    re.compile(r"^\d+,\d+,\d+,[^;]*;"),  # /dev/kmsg record header
    re.compile(r"^\[\s*\d+\.\d+\]\s*"),  # dmesg
    re.compile(r"^.*?\bkernel: (?:\[\s*\d+\.\d+\]\s*)?"),  # journal / syslog
]


def message_of(line: str) -> str | None:
    """The kernel message of a log line; None for a /dev/kmsg continuation line."""
    if line.startswith((" ", "\t")) and "=" in line and ":" not in line.split("=", 1)[0]:
        return None
    text = line.rstrip("\r\n")
    for rx in _PREFIXES:
        text = rx.sub("", text, count=1)
    return text


def _timeout_code(code: str, errno: int | None) -> str:
    """-110 on an attached device's transfer is the device not answering."""
    if errno == -110 and code in ("video.control_error", "video.stream_error", "audio.stream_error"):
        return code  # the subsystem's own code is more precise; errno keeps the timeout
    return code


MAX_LINE = 2048  # the kernel's own lines are shorter; a longer one is cut before any pattern runs on it


def parse_line(line: str, line_no: int = 0) -> Signal | None:
    msg = message_of(line[:MAX_LINE])
    if not msg:
        return None
    for rx, code in _RULES:
        m = rx.search(msg)
        if not m:
            continue
        gd = m.groupdict()
        if gd.get("hub") is not None:
            port: str | None = _hubport(m)
        elif gd.get("hubdev") is not None:
            port = _hubdev_port(gd["hubdev"], gd["hport"])
        else:
            port = gd.get("port")
        raw_errno = gd.get("errno") or gd.get("errno2") or gd.get("errno3")
        errno = int(raw_errno) if raw_errno else None
        if code == "usb.enumeration_failed" and errno is None:
            m2 = re.search(r"error (-\d+)", msg)
            errno = int(m2.group(1)) if m2 else None
        devnum = int(gd["devnum"]) if gd.get("devnum") else None
        iface = int(gd["iface"]) if gd.get("iface") else None
        return Signal(line_no, port, _timeout_code(code, errno), errno, msg[:512], devnum, iface)
    return None


def parse_lines(lines: Iterable[str], start: int = 1) -> Iterator[Signal]:
    for n, line in enumerate(lines, start):
        sig = parse_line(line, n)
        if sig is not None:
            yield sig
