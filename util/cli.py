"""Error handling shared by the entry points (main_*.py, scripts/*.py).

A problem the user can fix raises `UserError`; `run_cli` turns it into one line on stderr and exit
code 2. Any other failure becomes one line and exit code 1. Tracebacks only with `--debug`.
"""
import argparse
import copy
import sys
import traceback
from typing import Callable, Optional, Sequence


class UserError(Exception):
    """A problem the user can fix; the message names the file or flag and says what to do."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag under its first long name: further long names are old names, still accepted
    (`add_argument("--batch_size", "--batch", ...)`) but no longer advertised."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if len(longs) > 1:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if not s.startswith("--")] + longs[:1]
        return super()._format_action_invocation(action)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exit code 2 (the usage is one --help away)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class DefaultsHelpFormatter(HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help only where it tells something: not to on/off switches, not
    to None or empty defaults, and not where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def comma_subset(flag: str, text: str, choices: Sequence[str]) -> list[str]:
    """A comma-separated flag value -> its items, each one of `choices`; a one-line UserError otherwise."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or any(t not in choices for t in items):
        raise UserError(f"{flag} {text!r}: choose a comma-separated subset of {','.join(choices)}")
    return items


def check_minimum(values: dict[str, float], minimum: int) -> None:
    """A one-line UserError for the first flag {flag: value} below `minimum` (1: counts, 0: amounts)."""
    bound = "at least 1" if minimum == 1 else f"{minimum} or more"
    for flag, value in values.items():
        if value < minimum:
            raise UserError(f"{flag} {value}: must be {bound}")


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
