"""The rule table on disk: written atomically on every change, read back at start.

The file uses the config format, so an operator can read it, diff it or copy it to a config file.
Writing is a new tmp file (random name, O_EXCL|O_NOFOLLOW) → fsync → rename → fsync of the
directory: after a crash (even SIGKILL or a power cut) the file holds either the old or the new
table, never a torn one. The directory is refused if another user could write to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from mcrelay import config
from mcrelay.errors import ConfigError, McrelayError
from mcrelay.rules import Rule
from mcrelay.system.paths import (
    UnsafePath,
    check_directory,
    create_temporary,
    ensure_safe_directory,
)
from mcrelay.worker.faults import faults_for

DEFAULT_STATE_DIR = Path("/var/lib/mcrelay")
STATE_FILE = "rules.toml"
STATE_DIRECTORY = "state directory"


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
        """The saved table, or None when nothing was ever saved; UnsafePath for a state
        directory another user could write to."""
        if self.directory.exists():
            check_directory(self.directory, STATE_DIRECTORY)
        if not self.path.exists():
            return None
        try:
            return config.load(self.path)
        except ConfigError as exc:
            raise StateError(f"saved rule table is unreadable: {exc}") from None

    def save(self, rules: tuple[Rule, ...]) -> None:
        """Replace the saved table atomically; StateError (and the old file intact) on failure."""
        tmp: Path | None = None
        try:
            ensure_safe_directory(self.directory, STATE_DIRECTORY)
            tmp, fd = create_temporary(self.directory, STATE_FILE, 0o640)
            try:
                if "state-write" in faults_for("supervisor"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                data = config.dump(rules).encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise StateError(
                f"cannot save the rule table in {self.directory}: {exc.strerror or exc}; "
                "nothing changed"
            ) from None
        except UnsafePath as exc:
            raise StateError(f"{exc}; nothing changed") from None
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
