"""The one exception type for problems the user can fix (bad input, bad config, missing files)."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints its message on one line and exits non-zero."""
