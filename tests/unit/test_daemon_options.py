"""supervisor/options.py: the defaults come from the daemon's own settings, bad options are refused.

Pure: nothing starts, no socket is made; the only lookups are of groups (``root`` exists
everywhere, the made-up name nowhere).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer

from mcrelay.cli import app
from mcrelay.dataplane.ring_size import CAPTURE_RING, capture_ring
from mcrelay.errors import McrelayError
from mcrelay.policy import AccessPolicy
from mcrelay.supervisor import DEFAULTS, BackoffPolicy, BadOption, DaemonOptions
from mcrelay.supervisor.persistence import DEFAULT_STATE_DIR
from mcrelay.supervisor.settings import SupervisorSettings
from mcrelay.supervisor.start import refusal

NO_GROUP = "mcrelay-no-such-group-x"


def test_defaults_are_the_settings_defaults() -> None:
    settings, backoff = SupervisorSettings(), BackoffPolicy()
    assert DaemonOptions() == DEFAULTS
    assert DEFAULTS.control_socket == settings.control_socket
    assert DEFAULTS.state_dir == DEFAULT_STATE_DIR
    assert DEFAULTS.log_level == settings.log_level
    assert (DEFAULTS.user, DEFAULTS.control_user) == (settings.worker_user, settings.control_user)
    assert (DEFAULTS.backoff_initial, DEFAULTS.backoff_max, DEFAULTS.stable_after) == (
        backoff.initial,
        backoff.maximum,
        backoff.stable_after,
    )
    assert DEFAULTS.heartbeat_timeout == settings.heartbeat_timeout
    assert (DEFAULTS.max_failures, DEFAULTS.failure_window) == (
        settings.max_failures,
        settings.failure_window,
    )
    assert DEFAULTS.num_workers is None  # one per CPU, as the settings decide
    # Built from nothing but defaults, the settings are the settings' own defaults.
    assert DaemonOptions().settings() == settings


def test_the_command_line_shows_exactly_these_options_and_defaults() -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    params = group.commands["supervisor"].make_context("supervisor", []).params
    # Same names (each option is a field) and, given nothing, the same values.
    assert params == dataclasses.asdict(DEFAULTS)


def test_options_become_settings() -> None:
    options = DaemonOptions(
        control_socket=Path("/tmp/x.sock"),
        num_workers=3,
        backoff_initial=0.5,
        backoff_max=4.0,
        stable_after=5.0,
        heartbeat_timeout=0.6,
        max_failures=2,
        failure_window=9.0,
        exit_on_fatal=True,
        keep_runtime_rules=True,
        socket_group="root",
        allow_input_interface=("eth0",),
        allow_loopback=True,
        log_level="debug",
    )
    settings = options.settings()
    assert settings.control_socket == Path("/tmp/x.sock")
    assert settings.num_workers == 3
    assert settings.backoff == BackoffPolicy(0.5, 4.0, 5.0)
    assert (settings.max_failures, settings.failure_window) == (2, 9.0)
    assert settings.exit_on_fatal and settings.keep_runtime_rules
    assert settings.socket_gid == 0 and settings.read_gid is None
    assert settings.policy == AccessPolicy(input_interfaces=("eth0",), allow_loopback=True)
    assert settings.log_level == "debug"
    # Three heartbeats per timeout, never slower than the default beat.
    assert settings.heartbeat_interval == pytest.approx(0.2)
    assert DaemonOptions(heartbeat_timeout=30).settings().heartbeat_interval == (
        SupervisorSettings().heartbeat_interval
    )
    data = DaemonOptions(data_heartbeat_timeout=0.6, capture_ring_mib=16).settings()
    assert data.data_heartbeat_interval == pytest.approx(0.2)
    assert data.capture_ring_mib == 16


def test_a_capture_ring_covers_a_second_of_outage_by_default() -> None:
    ring = capture_ring(SupervisorSettings().capture_ring_mib)
    assert ring == CAPTURE_RING
    assert (ring.mapped_size, ring.block_count, ring.low_rate_cover_s) == (64 << 20, 512, 1.024)
    assert capture_ring(16).block_count == 128


@pytest.mark.parametrize(
    ("options", "option", "reason"),
    [
        (DaemonOptions(log_level="loud"), "--log-level", "unknown log level 'loud'"),
        (
            DaemonOptions(backoff_initial=2.0, backoff_max=1.0),
            "--backoff-max",
            "must be at least --backoff-initial",
        ),
        (DaemonOptions(num_workers=0), "--num-workers", "below the minimum 1"),
        (DaemonOptions(heartbeat_timeout=0.01), "--heartbeat-timeout", "below the minimum"),
        (DaemonOptions(max_failures=0), "--max-failures", "below the minimum"),
        (DaemonOptions(metrics_listen="nope"), "--metrics-listen", "use ADDR:PORT"),
        (DaemonOptions(data_heartbeat_timeout=0.01), "--data-heartbeat-timeout", "below"),
        (DaemonOptions(capture_ring_mib=0), "--capture-ring-mib", "below the minimum 1"),
        (DaemonOptions(capture_ring_mib=4096), "--capture-ring-mib", "above the maximum 1024"),
    ],
)
def test_bad_options_are_refused(options: DaemonOptions, option: str, reason: str) -> None:
    with pytest.raises(BadOption) as caught:
        options.check()
    assert caught.value.option == option
    assert reason in caught.value.reason
    with pytest.raises(BadOption):
        options.settings()  # settings are never built from a bad option


def test_lookups_refuse_in_one_sentence() -> None:
    with pytest.raises(McrelayError, match=f"^--read-group {NO_GROUP}: no such group$"):
        DaemonOptions(read_group=NO_GROUP).settings()
    with pytest.raises(McrelayError, match="--allow-output 'bad'"):
        DaemonOptions(allow_output=("bad",)).settings()


def test_a_refusal_names_every_reason_and_a_bug_is_none() -> None:
    both = ExceptionGroup("", [McrelayError("a"), ExceptionGroup("", [OSError(98, "taken")])])
    assert refusal(both) == "a; cannot start: [Errno 98] taken"
    assert refusal(McrelayError("alone")) == "alone"
    assert refusal(ExceptionGroup("", [McrelayError("a"), KeyError("bug")])) is None
