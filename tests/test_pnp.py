"""Windows problem-code parsing over the three forms PowerShell prints."""

from __future__ import annotations

from pathlib import Path

from agent.signals.pnp import parse

DATA = Path(__file__).parent / "data" / "windows"


def test_list_form_working_device() -> None:
    [d] = parse((DATA / "usbstor-list.txt").read_text(encoding="utf-8"))
    assert (d.vid, d.pid, d.problem_code, d.status) == ("0781", "5591", 0, "OK")
    assert d.serial and d.serial.startswith("0501F3E0")
    assert d.error is None


def test_json_form_problem_codes() -> None:
    devs = parse((DATA / "camera-code43.json").read_text(encoding="utf-8"))
    assert [(d.vid, d.pid, d.serial, d.problem_code) for d in devs] == [
        ("046d", "0843", None, 43), ("0b0e", "2456", "0123456789AB", 0), ("046d", "0843", "A1B2C3D4", 10)]
    err = devs[0].error
    assert err is not None and (err["code"], err["source"], err["problem_code"]) == ("os.problem", "pnp", 43)
    assert "Logitech Webcam C930e" in str(err["message"])
    assert devs[1].error is None


def test_table_form() -> None:
    devs = parse((DATA / "get-pnpdevice-table.txt").read_text(encoding="utf-8"))
    assert [(d.vid, d.pid, d.name, d.status) for d in devs] == [
        ("04f2", "b5d7", "Chicony USB2.0 Camera", "OK"), ("046d", "085e", "Logitech BRIO", "Error")]
    assert devs[0].error is None and devs[1].error is not None


def test_overcurrent_problem_status() -> None:
    [d] = parse('{"InstanceId": "USB\\\\VID_046D&PID_0843\\\\X1", "Problem": 0, '
                '"ProblemDescription": "DeviceCausedOvercurrent", "Status": "Error"}')
    assert d.error is not None and d.error["code"] == "usb.over_current"


def test_garbage_gives_nothing() -> None:
    assert parse("") == [] and parse("not powershell output\n\x00") == [] and parse("[1, 2, null]") == []


def test_consent_store_usage() -> None:
    from agent.usage_windows import parse_reg_query, users_by_kind

    uses = parse_reg_query((DATA / "consentstore.txt").read_text(encoding="utf-8"))
    assert [(u.capability, u.app, u.in_use) for u in uses] == [
        ("webcam", "Microsoft.WindowsCamera_8wekyb3d8bbwe", False),
        ("webcam", "Zoom.exe", True),
        ("webcam", "app.exe", True),
        ("microphone", "Zoom.exe", True),
        ("microphone", "lync.exe", False),
    ]
    # app.exe says "in use" but is not running: a stale entry, ignored
    assert users_by_kind(uses, ["System", "Zoom.exe", "explorer.exe"]) == {
        "camera": ["Zoom.exe"], "speakerphone": ["Zoom.exe"], "microphone": ["Zoom.exe"]}
    assert users_by_kind(uses, ["explorer.exe"]) == {}
