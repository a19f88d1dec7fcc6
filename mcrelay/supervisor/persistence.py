"""The rule table on disk: written atomically on every change, read back at start.

The file uses the config format, so an operator can read it, diff it or copy it to a config file.
Writing is tmp file → fsync → rename → fsync of the directory: after a crash (even SIGKILL or a
power cut) the file holds either the old or the new table, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from mcrelay import config
from mcrelay.errors import ConfigError, McrelayError
from mcrelay.rules import Rule
from mcrelay.worker.faults import faults_for

DEFAULT_STATE_DIR = Path("/var/lib/mcrelay")
STATE_FILE = "rules.toml"


class StateError(McrelayError):
    """The state directory cannot hold the rule table; the change was not made."""


class StateNotDurable(StateError):
    """The new table replaced the file but the directory could not be synced: the change is
    made (a restart reads it back); only a power cut could still bring back the old table."""


class RuleStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> tuple[Rule, ...] | None:
        """The saved table, or None when nothing was ever saved."""
        if not self.path.exists():
            return None
        try:
            return config.load(self.path)
        except ConfigError as exc:
            raise StateError(f"saved rule table is unreadable: {exc}") from None

    def save(self, rules: tuple[Rule, ...]) -> None:
        """Replace the saved table atomically; StateError (and the old file intact) on failure."""
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                data = config.dump(rules).encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(
                f"cannot save the rule table in {self.directory}: {exc.strerror or exc}; "
                "nothing changed"
            ) from None
        try:
            self._sync_directory()
        except OSError as exc:
            raise StateNotDurable(
                f"the rule table was saved, but {self.directory} could not sync: "
                f"{exc.strerror or exc}; the change is made and kept at restart, "
                "though a power cut now could undo it"
            ) from None

    def _sync_directory(self) -> None:
        if "state-dir-fsync" in faults_for("supervisor"):
            raise OSError(errno.EIO, "injected fault state-dir-fsync")
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
