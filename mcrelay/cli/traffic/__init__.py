"""Traffic tools for testing a relay by hand: ``mcrelay gen`` and ``mcrelay sink``.

`commands` is their typer layer; `gen` and `sink` do the sending and receiving over the socket
plumbing in `net`, with the datagram format of `payload`.
"""

from mcrelay.cli.traffic.commands import gen_command, sink_command

__all__ = ["gen_command", "sink_command"]
