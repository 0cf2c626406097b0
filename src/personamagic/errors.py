"""The exception types for user mistakes: the CLI prints them as a single `error: ...` line."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, no face...). The message says what to do."""

    exit_code = 2  # what the command exits with


class FolderInUse(UserError):
    """An output folder another live run holds (its lock): `train-many` leaves that identity to it."""


class SettingsError(UserError):
    """A mistake in the run's settings that no photo changes (e.g. more S* vectors than the prompts hold):
    a job over many identities stops at the first instead of reporting it for each."""


class Interrupted(UserError):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to go on."""

    exit_code = 130


# What `json.loads` raises on text that is damaged or hostile: a syntax error (JSONDecodeError is a
# ValueError), an integer of more digits than Python converts (ValueError), nesting deeper than the
# parser recurses (RecursionError). Every read of JSON from a file catches all of them.
BAD_JSON = (ValueError, RecursionError)
