"""Pantau agent: observe USB video-conference devices and report over MQTT."""

__version__ = "1.0.0"
