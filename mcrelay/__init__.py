"""mcrelay: relay multicast UDP across boundaries that kernel routing cannot cross."""

__version__ = "0.1.0"
