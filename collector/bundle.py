"""The agent's installer bundle, served by the collector to room PCs that have no package index.

``build`` makes wheels of the agent and all its dependencies (``pip wheel`` from the local checkout,
plus pip's own wheel, which runs straight from the file) into one folder with an ``index.txt`` of
SHA-256 sums. ``install_sh`` renders the script behind ``curl -fsSL https://COLLECTOR/install.sh |
sudo sh -s -- TOKEN``: it downloads that bundle from the collector pinned to its certificate,
checks every sum, installs into /opt/pantau-agent and runs ``pantau-agent enroll --install``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys

INDEX = "index.txt"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.whl$")


class BundleError(RuntimeError):
    pass


def checkout_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(out_dir: str, source: str | None = None, pip_args: tuple[str, ...] = ()) -> list[str]:
    """Wheels of ``pantau[agent]`` (from ``source``, default this checkout) and its dependencies, and
    pip's own wheel, in ``out_dir``; writes ``index.txt``. Returns the wheel names."""
    source = source or checkout_root()
    if not os.path.exists(os.path.join(source, "pyproject.toml")):
        raise BundleError(f"bundle: {source} is not a Pantau checkout (no pyproject.toml)")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # a fresh set: no stale version of a dependency lingers
        if name.endswith(".whl") or name == INDEX:
            os.unlink(os.path.join(out_dir, name))
    for args in ([f"{source}[agent]"], ["pip"]):
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", out_dir, *pip_args, *args],
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BundleError(f"bundle: pip wheel {args[0]} failed: {last[0]}")
    return write_index(out_dir)


def write_index(out_dir: str) -> list[str]:
    names = sorted(n for n in os.listdir(out_dir) if NAME_RE.match(n))
    lines = []
    for n in names:
        with open(os.path.join(out_dir, n), "rb") as fh:
            lines.append(f"{hashlib.sha256(fh.read()).hexdigest()} {n}")
    tmp = os.path.join(out_dir, INDEX + ".tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out_dir, INDEX))
    return names


def bundle_file(bundle_dir: str, name: str) -> str | None:
    """The path of a file the collector may serve from the bundle, or None."""
    if name != INDEX and not NAME_RE.match(name):
        return None
    path = os.path.join(bundle_dir, name)
    return path if os.path.isfile(path) else None


# ---------------------------------------------------------------- pins


def _der_items(data: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, start of the whole element, end) of each DER element in data[pos:end]."""
    out = []
    while pos < end:
        tag, start = data[pos], pos
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[pos:pos + n], "big")
            pos += n
        out.append((tag, start, pos + length))
        pos += length
    return out


def _body(data: bytes, start: int) -> int:
    length = data[start + 1]
    return start + 2 + (length & 0x7F if length & 0x80 else 0)


def spki_pin(cert_der: bytes) -> str:
    """curl's ``--pinnedpubkey`` value for a certificate: ``sha256//`` + base64 of its public key info."""
    try:
        (_, cert, cert_end), = _der_items(cert_der, 0, len(cert_der))[:1]
        tbs = _der_items(cert_der, _body(cert_der, cert), cert_end)[0]
        fields = _der_items(cert_der, _body(cert_der, tbs[1]), tbs[2])
        if fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        _, s, e = fields[5]  # serial, signature, issuer, validity, subject, subjectPublicKeyInfo
    except (IndexError, ValueError) as exc:
        raise BundleError(f"bundle: cannot read the certificate's public key: {exc}") from None
    return "sha256//" + base64.b64encode(hashlib.sha256(cert_der[s:e]).digest()).decode()


# ---------------------------------------------------------------- install.sh


def install_sh(collector_url: str, fingerprint: str) -> str:
    """The Linux installer for this collector (address and certificate fingerprint baked in)."""
    if not re.match(r"^https://[A-Za-z0-9.:\[\]-]+$", collector_url) or not re.match(r"^[0-9A-F:]{95}$", fingerprint):
        raise BundleError("bundle: the collector's public URL or fingerprint is malformed")
    return INSTALL_SH.replace("@COLLECTOR@", collector_url).replace("@FINGERPRINT@", fingerprint)


INSTALL_SH = r"""#!/bin/sh
# Pantau agent installer, served by the collector at @COLLECTOR@
#   curl -fsSL ... @COLLECTOR@/install.sh | sudo sh -s -- TOKEN
# Downloads the agent's wheels from the collector (pinned to its certificate), checks their SHA-256,
# installs them into /opt/pantau-agent without any package index, enrolls this PC with TOKEN and
# starts the pantau-agent service.
set -eu
COLLECTOR='@COLLECTOR@'
FINGERPRINT='@FINGERPRINT@'
PREFIX="${PANTAU_INSTALL_DIR:-/opt/pantau-agent}"
CONFIG="${PANTAU_CONFIG:-/etc/pantau/agent.toml}"
STATE_DIR="${PANTAU_STATE_DIR:-/var/lib/pantau-agent}"
LOG="${PANTAU_INSTALL_LOG:-/var/log/pantau-agent.log}"
TOKEN="${1:-}"
die() { echo "install.sh: $*" >&2; exit 2; }
[ -n "$TOKEN" ] || die "no token: run it as  curl -fsSL $COLLECTOR/install.sh | sudo sh -s -- TOKEN"
[ "$(id -u)" = 0 ] || die "run it as root (sudo sh -s -- TOKEN)"
command -v python3 >/dev/null 2>&1 || die "python3 is needed (Debian/Ubuntu: apt-get install python3)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11 or newer is needed"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT INT TERM
python3 - "$COLLECTOR" "$FINGERPRINT" "$TMP" <<'PY' || die "could not download the agent from $COLLECTOR"
import hashlib, http.client, os, re, ssl, sys
from urllib.parse import urlsplit
url, pin, out = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), sys.argv[3]
u = urlsplit(url)
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # trust is the pinned fingerprint
def get(name):
    c = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=60, context=ctx)
    c.connect()
    if hashlib.sha256(c.sock.getpeercert(True)).digest() != pin:
        sys.exit("install.sh: the collector's certificate does not match its fingerprint")
    c.request("GET", "/enroll/bundle/" + name)
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"install.sh: {name}: HTTP {r.status}")
    return data
for line in get("index.txt").decode().splitlines():
    digest, name = line.split()
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.whl$", name):
        sys.exit(f"install.sh: refusing file name {name!r}")
    data = get(name)
    if hashlib.sha256(data).hexdigest() != digest:
        sys.exit(f"install.sh: {name} does not match its SHA-256")
    with open(os.path.join(out, name), "wb") as fh:
        fh.write(data)
PY
[ -x "$PREFIX/bin/python" ] || python3 -m venv --without-pip "$PREFIX" || die "cannot create $PREFIX"
PIP=$(ls "$TMP"/pip-*.whl | head -n 1)
"$PREFIX/bin/python" "$PIP/pip" install --quiet --disable-pip-version-check --no-index --find-links "$TMP" \
  --upgrade 'pantau[agent]' || die "installing the agent's wheels failed"
if [ -d /run/systemd/system ]; then
  "$PREFIX/bin/pantau-agent" --config "$CONFIG" enroll "$COLLECTOR" "$TOKEN" --fingerprint "$FINGERPRINT" \
    --state-dir "$STATE_DIR" --install --force
else  # no systemd (a container, a minimal system): enroll, then run the agent in the background
  "$PREFIX/bin/pantau-agent" --config "$CONFIG" enroll "$COLLECTOR" "$TOKEN" --fingerprint "$FINGERPRINT" \
    --state-dir "$STATE_DIR" --force
  mkdir -p "$STATE_DIR" && chmod 700 "$STATE_DIR"
  PANTAU_STATE_DIR="$STATE_DIR" nohup "$PREFIX/bin/pantau-agent" --config "$CONFIG" run >>"$LOG" 2>&1 &
  echo "$!" > "$STATE_DIR/agent.pid"
  echo "no systemd: the agent runs in the background (pid $!, log $LOG); have it started at boot"
fi
"""
