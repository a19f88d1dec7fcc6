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
