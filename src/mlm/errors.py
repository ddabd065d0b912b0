"""The one exception type for problems the user can fix (bad input, bad config, missing files)."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints its message on one line and exits non-zero."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run over many), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
