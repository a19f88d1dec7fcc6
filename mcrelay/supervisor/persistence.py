"""The rule table on disk: written atomically on every change, read back at start.

The file uses the config format, so an operator can read it, diff it or copy it to a config file.
A comment line after the first records what the table was last made from (its seed: the digest
and ids of the --config file's rules, see `mcrelay.supervisor.precedence`); a file without it,
as older versions wrote, still loads (with no seed), and older versions read the new file as
an ordinary rule file.
Writing is a new tmp file (random name, O_EXCL|O_NOFOLLOW) → fsync → rename → fsync of the
directory: after a crash (even SIGKILL or a power cut) the file holds either the old or the new
table, never a torn one. The directory is refused if another user could write to it.

A file that cannot be used (not UTF-8, not TOML, not rules, not a regular file) is moved aside
to ``rules.toml.corrupt-<UTC time>`` (renamed, never deleted or overwritten) so the daemon can
start without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import stat
import time
from pathlib import Path

from mcrelay import config
from mcrelay.errors import ConfigError, McrelayError
from mcrelay.rules import Rule
from mcrelay.supervisor.precedence import Seed
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
#: The comment line that records the seed, followed by JSON: {"digest": …, "ids": […]}.
SEED_PREFIX = "# mcrelay-config-seed: "
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class StateError(McrelayError):
    """The state directory cannot hold the rule table; the change was not made."""


class StateNotDurable(StateError):
    """The new table replaced the file but the directory could not be synced: the change is
    made (a restart reads it back); only a power cut could still bring back the old table."""


class UnreadableState(StateError):
    """The state file exists but cannot be used as a rule table (see `RuleStore.move_aside`)."""


@dataclasses.dataclass(frozen=True)
class SavedState:
    rules: tuple[Rule, ...]
    #: What the table was last made from; None in a file of an older version.
    seed: Seed | None


class RuleStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        #: Written with every save: what the table was last made from.
        self.seed: Seed | None = None
        #: Where an unreadable state file was moved at start, if it was.
        self.moved_aside: Path | None = None

    def load(self) -> SavedState | None:
        """The saved table, or None when nothing was ever saved; UnsafePath for a state
        directory another user could write to, UnreadableState (one sentence) for a file
        that is not a rule table. The seed it records becomes this store's."""
        if self.directory.exists():
            check_directory(self.directory, STATE_DIRECTORY)
        try:
            text = self._read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise UnreadableState(f"{self.path}: cannot read: {reason or exc}") from None
        except UnicodeDecodeError as exc:
            raise UnreadableState(f"{self.path}: not UTF-8 text ({exc.reason})") from None
        try:
            rules = config.parse(text, str(self.path))
        except ConfigError as exc:
            raise UnreadableState(str(exc)) from None
        self.seed = _seed(text)
        return SavedState(rules, self.seed)

    def _read(self) -> str:
        fd = os.open(self.path, _READ_FLAGS)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8")

    def move_aside(self) -> Path:
        """Rename the state file to ``rules.toml.corrupt-<UTC time>`` (a symlink is renamed,
        never followed; an existing name is never replaced); StateError if it cannot be."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(100):
            aside = self.directory / f"{STATE_FILE}.corrupt-{stamp}{f'-{n}' if n else ''}"
            try:
                os.link(self.path, aside, follow_symlinks=False)  # fails if the name exists
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise StateError(f"cannot move {self.path} aside: {exc.strerror}") from None
                # No hard links here: a rename, to a name checked free in a directory only
                # root or this user can write to.
                if os.path.lexists(aside):
                    continue
                try:
                    os.rename(self.path, aside)
                except OSError as exc2:
                    raise StateError(f"cannot move {self.path} aside: {exc2.strerror}") from None
            else:
                try:
                    self.path.unlink()
                except OSError as exc:
                    aside.unlink()
                    raise StateError(f"cannot move {self.path} aside: {exc.strerror}") from None
            with contextlib.suppress(OSError):
                self._sync_directory()
            self.moved_aside = aside
            return aside
        raise StateError(f"cannot move {self.path} aside: every name is taken")

    def save(self, rules: tuple[Rule, ...]) -> None:
        """Replace the saved table (with the store's seed) atomically; StateError (and the old
        file intact) on failure."""
        tmp: Path | None = None
        try:
            ensure_safe_directory(self.directory, STATE_DIRECTORY)
            tmp, fd = create_temporary(self.directory, STATE_FILE, 0o640)
            try:
                if "state-write" in faults_for("supervisor"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                data = _with_seed(config.dump(rules), self.seed).encode()
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


def _with_seed(text: str, seed: Seed | None) -> str:
    if seed is None:
        return text
    first, _, rest = text.partition("\n")
    line = json.dumps({"digest": seed.digest, "ids": list(seed.ids)}, ensure_ascii=False)
    return f"{first}\n{SEED_PREFIX}{line}\n{rest}"


def _seed(text: str) -> Seed | None:
    """The seed recorded in the comments that open the file; None if there is none (or it is
    not one this version wrote: the config file then wins, which is never wrong)."""
    for line in text.splitlines():
        if not line.startswith("#"):
            return None
        if line.startswith(SEED_PREFIX):
            try:
                value = json.loads(line[len(SEED_PREFIX) :])
            except ValueError:
                return None
            if not isinstance(value, dict):
                return None
            digest, ids = value.get("digest"), value.get("ids")
            if not isinstance(digest, str) or not isinstance(ids, list):
                return None
            if not all(isinstance(i, str) for i in ids):
                return None
            return Seed(digest, tuple(ids))
    return None
