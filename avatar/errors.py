"""The one domain exception: its message is what the user sees, in one line."""


class AvatarError(Exception):
    """A problem the user can fix (bad input, missing device). The CLI prints it without a traceback."""
