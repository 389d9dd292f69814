"""Configuration pieces both sides use: the one-line error, broker URLs and reading TOML."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit


class ConfigError(ValueError):
    """One clear line: which key, what is wrong."""


@dataclass(frozen=True)
class Broker:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"


def parse_broker(url: str, key: str = "broker") -> Broker:
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"config: {key}: {url!r} is not a broker URL ({exc})") from None
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname or port == 0:
        raise ConfigError(f"config: {key}: {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
    return Broker(u.scheme, u.hostname, port or (8883 if u.scheme == "mqtts" else 1883),
                  unquote(u.username) if u.username else None, unquote(u.password) if u.password else None)


def name_the_source(exc: ConfigError, from_env: set[str]) -> ConfigError:
    """``exc`` saying ``PANTAU_<KEY>`` beside the key when that key's value came from the environment."""
    text = str(exc)
    for key in from_env:
        head = f"config: {key}:"
        if text.startswith(head):
            return ConfigError(f"config: {key} (from PANTAU_{key.upper()}):{text[len(head):]}")
    return exc


def read_toml(path: str, what: str = "config", error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A TOML file as a dict; ``error`` with one clear line if it cannot be read or parsed."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise error(f"{what}: cannot read {path}: {exc.strerror}") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 with a byte-order mark, as some Windows editors save it
        raw = raw[3:]
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{what}: {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what}: {path} is not valid TOML: {exc}") from None
