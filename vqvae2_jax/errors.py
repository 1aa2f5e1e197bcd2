"""Errors a user can fix: main prints their message alone, no traceback.

Every message reads "<what is wrong>. Fix: <what to do>." Raise one of these
(or a subclass) where the cause is outside the program (input, config, disk,
permissions); programming errors stay ordinary exceptions with tracebacks.
"""


class UserError(Exception):
  """An error whose message tells the user what to change."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (names the field and a value that can)."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be written or is full (names the path)."""
