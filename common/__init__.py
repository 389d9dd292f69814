"""What the agent and the collector share: the wire protocol, configuration helpers and the version.

Neither side imports the other; both import this package (it depends on the standard library only).
"""

__version__ = "1.1.0"
