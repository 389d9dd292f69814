"""Pantau agent: observe USB video-conference devices and report over MQTT."""

from common import __version__

__all__ = ["__version__"]
