"""The errors that fastnet reports to a person rather than as a traceback.

The message of each is one line that names the problem and says what to do about it; the CLI prints
it as it is and exits with the error's `exit_status`.
"""

import signal


class FastnetError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting."""

    exit_status = 2


class SettingError(FastnetError, ValueError):
    """A value that no run can use for one setting (fastnet.settings has the rules). The message
    names the setting where it says {setting}: as Python spells it in str(), `dropout`, and as the
    command line does in on_command_line(), `--dropout`. A ValueError too, as Python's own checks of
    an argument's value are."""

    def __init__(self, setting: str, message: str):
        self.setting, self.message = setting, message
        super().__init__(message.replace("{setting}", setting))

    def on_command_line(self) -> str:
        return self.message.replace("{setting}", "--" + self.setting.replace("_", "-"))


class VariableError(FastnetError, ValueError):
    """An environment variable fastnet reads (FASTNET_BLAS, FASTNET_PLAN ...) holds a value it cannot use."""


class SpaceError(FastnetError):
    """A sweep's search space that cannot be searched: unreadable, an unknown or fixed setting, an
    empty range, a value fastnet train would refuse (fastnet.sweep.space)."""


class DataError(FastnetError):
    """A dataset that is missing, malformed or inconsistent."""


class CheckpointError(FastnetError):
    """A checkpoint that is missing, foreign, truncated or does not fit the data."""


class DatabaseLost(FastnetError):
    """A sweep's database that went away mid-sweep: its own status, since what it recorded is kept
    and the same command continues once it is back."""

    exit_status = 3


class PeerLost(FastnetError):
    """A rank of a data-parallel run that died or stopped answering: its own status, since the last
    checkpoint is kept and the same command with --resume continues."""

    exit_status = 3


class StorageError(FastnetError):
    """A file the storage would not let fastnet write: a full disk, a quota, an I/O error, a
    filesystem gone read-only (fastnet.storage.refused says which and what to do). Its own status,
    as a lost rank's or database's: the command was right, and every file keeps its last whole
    version, since each is written under a temporary name and renamed; once the storage is fixed,
    the same command (with --resume, for a run that has a checkpoint) continues. The message is
    the `problem`, then what to run after fixing it: `then`, which the code that knows what was
    saved replaces with continued()."""

    exit_status = 3

    def __init__(self, problem, then="run the same command again"):
        self.problem, self.then = problem, then
        super().__init__(f"{problem}, then {then}")

    def continued(self, then):
        return StorageError(self.problem, then)

    def __reduce__(self):  # the arguments are not the message: pickle them, for a sweep's workers
        return StorageError, (self.problem, self.then)


class DivergenceError(FastnetError):
    """Training produced a NaN or infinity; its own status, so scripts can retry with a lower rate."""

    exit_status = 3


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM. Not an error: the exit status is the shell's convention
    for death by that signal (128 + its number: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum
