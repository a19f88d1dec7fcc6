"""`gen`/`sink` command validation through typer's CliRunner; nothing is sent.

Bad input is a usage error (exit 2) naming the option; a tool that cannot run says so in one
line on stderr (exit 1); neither shows a traceback.
"""

import re

import pytest
import typer
from typer.testing import CliRunner

from mcrelay.cli.traffic.commands import gen_command, sink_command

app = typer.Typer()
app.command("gen")(gen_command)
app.command("sink")(sink_command)

GEN = ["gen", "--group", "239.1.2.3", "--port", "5000"]
SINK = ["sink", "--group", "239.1.2.3", "--port", "5000", "--interface", "lo"]


def run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    # Usage errors come in a box that may wrap; compare words only.
    return result.exit_code, " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gen", "--group", "239.1.2", "--port", "5000"], "'239.1.2' is not an IPv4 address"),
        (["gen", "--group", "nope", "--port", "5000"], "'nope' is not an IPv4 address"),
        (["gen", "--group", "ff02::1", "--port", "5000"], "is not an IPv4 address"),
        (["gen", "--group", "239.1.2.3", "--port", "0"], "'--port': 0 is outside 1-65535"),
        (["gen", "--group", "239.1.2.3", "--port", "65536"], "65536 is outside 1-65535"),
        ([*GEN, "--size", "23"], "'--size': payload size must be 24..65507 bytes, got 23"),
        ([*GEN, "--size", "65508"], "got 65508"),
        ([*GEN, "--rate", "-1"], "'--rate': -1.0 is negative"),
        ([*GEN, "--count", "-5"], "'--count': -5 is negative"),
        ([*GEN, "--ttl", "256"], "'--ttl': 256 is outside 0-255"),
        ([*GEN, "--source", "10.0.0.300"], "'--source': '10.0.0.300' is not an IPv4 address"),
        ([*GEN, "--interface", "no-such-if0"], "no such network interface: 'no-such-if0'"),
        (
            [*GEN, "--interface", "lo", "--source", "127.0.0.1"],
            "use either --interface or --source, not both",
        ),
        (["sink", "--group", "239.1.2.3", "--port", "5000"], "required to join the multicast"),
        (["sink", "--group", "1.2.3.4.5", "--port", "1"], "'1.2.3.4.5' is not an IPv4 address"),
        ([*SINK[:3], "--port", "70000", "--interface", "lo"], "70000 is outside 1-65535"),
        ([*SINK, "--count", "0"], "'--count': 0 is not positive"),
        ([*SINK, "--duration", "-1"], "'--duration': -1.0 is not positive"),
        ([*SINK, "--idle-timeout", "-0.5"], "'--idle-timeout': -0.5 is negative"),
        ([*SINK, "--expect-size", "3"], "'--expect-size': payload size must be"),
        (["sink", "--group", "239.1.2.3", "--port", "5", "--interface", "nope0"], "no such"),
    ],
)
def test_bad_input_is_a_usage_error(args, message):
    code, output = run(args)
    assert code == 2
    assert message in output


def test_missing_required_option():
    code, output = run(["gen", "--group", "239.1.2.3"])
    assert code == 2
    assert "--port" in output


def test_runtime_failure_is_one_line_and_exit_1():
    # 192.0.2.1 (TEST-NET-1) is on no interface, so the bind fails before anything is sent.
    result = CliRunner().invoke(app, [*GEN, "--source", "192.0.2.1"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("mcrelay gen: error: cannot use source 192.0.2.1:")
