"""The one exception type that means "the user gave us something wrong".

Command-line entry points catch it and print its message on one line (no traceback).
Messages must name the file, line, key or value at fault.
"""


class PrivrecError(Exception):
    """A user-facing error: bad config, bad data file, unknown item id, ..."""
