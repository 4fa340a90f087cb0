"""Error handling shared by the entry points (main_*.py, scripts/*.py).

A problem the user can fix raises `UserError`; `run_cli` turns it into one line on stderr and exit
code 2. Any other failure becomes one line and exit code 1. Tracebacks only with `--debug`.
"""
import argparse
import sys
import traceback
from typing import Callable, Optional


class UserError(Exception):
    """A problem the user can fix; the message names the file or flag and says what to do."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exit code 2 (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace,
            debug: Optional[bool] = None) -> int:
    """Run `main(args)` and return a process exit code; `debug` defaults to `args.debug`."""
    if debug is None:
        debug = bool(getattr(args, "debug", False))
    try:
        code = main(args)
        return int(code) if code is not None else 0
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into exit codes
        if debug:
            traceback.print_exc()
        msg = " ".join(str(e).split()) or "(no message)"
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"error: {type(e).__name__}: {msg}{hint}", file=sys.stderr, flush=True)
        return 1
