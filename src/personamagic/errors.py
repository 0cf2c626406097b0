"""The exception types for user mistakes: the CLI prints them as a single `error: ...` line."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, no face...). The message says what to do."""

    exit_code = 2  # what the command exits with


class Interrupted(UserError):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to go on."""

    exit_code = 130
