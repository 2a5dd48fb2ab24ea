"""The `fastnet` command: parses flags, runs the command, and turns every problem the user can fix
into one line on stderr and its exit status (2 for bad input), never a traceback."""

import os
import signal
import sys
import threading

from fastnet import distributed
from fastnet.cli import commands
from fastnet.cli.commands import train_config
from fastnet.cli.parser import UsageError, build_parser
from fastnet.errors import FastnetError, Interrupted, PeerLost, SettingError

__all__ = ["USAGE_ERROR", "UsageError", "build_parser", "main", "train_config"]

USAGE_ERROR = 2


def terminate(signum, frame):
    """SIGTERM outside training (where fastnet.train handles it) ends the command like Ctrl-C."""
    raise Interrupted(signum, "terminated")


def main(argv=None):
    parser = build_parser()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return USAGE_ERROR
        {"train": commands.run_train, "evaluate": commands.run_evaluate, "bench": commands.run_bench,
         "sweep": commands.run_sweep, "data": commands.run_data, "predict": commands.run_predict,
         "export": commands.run_export, "plot": commands.run_plot, "runs": commands.run_runs,
         "plan": commands.run_plan}[args.command](args)
    except FastnetError as exc:
        message = exc.on_command_line() if isinstance(exc, SettingError) else exc
        # Every rank of a data-parallel run meets the same bad setting: rank 0 says it once.
        if distributed.running is None or distributed.running.writes or isinstance(exc, PeerLost):
            print(f"fastnet: error: {message}", file=sys.stderr)
        distributed.abort(exc.exit_status)
        return exc.exit_status
    except Interrupted as exc:
        if distributed.running is None or distributed.running.writes:  # every rank stopped at this step
            print(f"fastnet: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("fastnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `fastnet evaluate ... | head`): not an error worth a traceback.
        # Point stdout at /dev/null so Python's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0
