"""Traffic tools for testing a relay by hand: ``mcrelay gen``, ``mcrelay sink``, ``mcrelay top``."""

from mcrelay.tools.commands import gen_command, sink_command
from mcrelay.tools.top import top_command

__all__ = ["gen_command", "sink_command", "top_command"]
