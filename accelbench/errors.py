"""The project's own error types: every expected failure is one of these, with a clear message."""


class AccelbenchError(Exception):
    """Base of accelbench's clear, user-facing errors (printed as one line, no traceback)."""


class DataError(AccelbenchError, ValueError):
    """Bad training or evaluation data: names the file/record and the fix."""


class ConfigError(AccelbenchError, ValueError):
    """An impossible option or combination: names the option and what is allowed."""


class BackendError(AccelbenchError):
    """A backend that is unknown, unavailable or broken."""
