"""One small exception hierarchy, so callers catch by meaning rather than by origin."""


class McrelayError(Exception):
    """Base of every error mcrelay raises on purpose; its message is fit for a user."""


class ProtocolError(McrelayError):
    """A peer sent something that breaks the wire protocol (bad frame, wrong version)."""


class ChannelClosed(McrelayError):
    """The other end of a channel went away; every transport failure maps to this."""


class ConfigError(McrelayError):
    """A config file or a rule is invalid; the message names the problem."""


class RuleError(ConfigError):
    """A rule is invalid or conflicts with the table."""


class SupervisorRunning(McrelayError):
    """Another live supervisor already owns the control socket path."""


def leaves(error: BaseException) -> list[BaseException]:
    """Every exception inside ``error``'s (possibly nested) groups, in order; ``[error]`` when it
    is no group. Callers report all of them: the first one of a group is not necessarily the
    cause, and the others are errors too (STYLE §7: never collapse a group to hide errors)."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def split(
    error: BaseException, kind: type[BaseException]
) -> tuple[BaseException | None, BaseException | None]:
    """``error`` parted into its ``kind`` and the rest (either None when empty), as
    ``BaseExceptionGroup.split`` does, but also for an exception that is no group: so a top level
    can take the shutdown part (say KeyboardInterrupt) off before it reports the rest."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(kind)
    return (error, None) if isinstance(error, kind) else (None, error)


def describe(error: BaseException) -> str:
    """Every leaf of ``error``, each as its message, joined by "; ": a log line that names all
    the errors of a group (one error: just its message)."""
    return "; ".join(str(leaf) for leaf in leaves(error))
