"""One exception type for everything the user can fix (bad flags, bad data, bad files).

The CLI turns it into one line on stderr and exit code 2; anything else is a bug (exit 1)."""


class UsageError(Exception):
    """Bad usage or bad input: the message is shown to the user as is."""
