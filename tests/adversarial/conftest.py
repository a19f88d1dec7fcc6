"""The live daemon the control-socket tests (test_control_*.py) share.

One daemon for all of them, so that "the rule table is what it was" and the last descriptor
check cover every input sent before; `tests.adversarial.control.TRIED` is printed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.adversarial import live_daemon
from tests.adversarial.control import TRIED, Live


@pytest.fixture(scope="package")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_daemon(tmp_path_factory.mktemp("control-socket")) as (d, base):
        yield d, base
        print(json.dumps({"control_socket_inputs": dict(sorted(TRIED.items()))}))
