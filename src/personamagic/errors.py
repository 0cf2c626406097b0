"""The one exception type for user mistakes: the CLI prints it as a single `error: ...` line."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, no face...). The message says what to do."""
