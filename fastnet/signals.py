"""Stopping a run cleanly: SIGINT and SIGTERM are turned into a request that the training loop
honours between steps, and the error that tells the user how to resume."""

import signal
import threading

from fastnet.errors import Interrupted


def interrupted(signum, progress, out, command="fastnet train"):
    return Interrupted(signum, f"stopped by {signal.Signals(signum).name} at epoch "
                               f"{progress.epochs_done + 1}, step {progress.step}; checkpoint saved: "
                               f"continue with: {command} --resume {out}")


class StopRequests:
    """While training, SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step
    instead of raising wherever the interpreter happens to be: mid-update, the parameters and the
    optimizer state could disagree, and the checkpoint written on the way out must be consistent.
    A second signal stops at once, for a user who does not want to wait."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():  # only it may set handlers
            return self
        for signum in self.SIGNALS:
            # A signal the caller ignores (a background job's SIGINT, say) stays ignored.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _request(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
