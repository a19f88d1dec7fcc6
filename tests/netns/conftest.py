"""Fixtures of the packet tests: the gen → relay → sink chain of namespaces, and a relay with
two data workers on it (files that need another relay define their own `relay`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import topology
from tests.lab.daemon import Daemon
from tests.lab.relay import relay_daemon


@pytest.fixture
def chain() -> Iterator[topology.Chain]:
    with topology.chain() as c:
        yield c


@pytest.fixture
def relay(chain: topology.Chain, tmp_path: Path) -> Iterator[Daemon]:
    with relay_daemon(chain.relay, tmp_path, "--num-workers", "2") as d:
        yield d
