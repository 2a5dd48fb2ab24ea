"""The errors that fastnet reports to a person rather than as a traceback.

The message of each is one line that names the problem and says what to do about it; the CLI prints
it as it is and exits with status 2.
"""


class FastnetError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting."""


class DataError(FastnetError):
    """A dataset that is missing, malformed or inconsistent."""


class CheckpointError(FastnetError):
    """A checkpoint that is missing, foreign, truncated or does not fit the data."""
