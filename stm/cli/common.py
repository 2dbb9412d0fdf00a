"""What both commands share: error handling, logging, a rate-limited logger."""

from __future__ import annotations

import functools
import logging
import sys

import click

from stm.errors import StmError, UsageError

log = logging.getLogger("stm")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def verbosity_options(func):
    func = click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")(func)
    return click.option("-q", "--quiet", is_flag=True, help="Only errors.")(func)


def setup_logging(prog: str, verbose: int, quiet: bool) -> None:
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    logging.basicConfig(level=level, format=f"{prog}: %(message)s", stream=sys.stderr)


def fail_cleanly(prog: str):
    """Turn stm's errors into one-line messages: exit 2 for usage, 1 for the rest."""

    def wrap(func):
        @functools.wraps(func)
        def inner(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except UsageError as exc:
                click.echo(f"{prog}: error: {exc}", err=True)
                sys.exit(2)
            except StmError as exc:
                click.echo(f"{prog}: {exc}", err=True)
                sys.exit(1)
            except BrokenPipeError:
                sys.exit(1)
            except OSError as exc:
                click.echo(
                    f"{prog}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(), err=True
                )
                sys.exit(1)

        return inner

    return wrap


def parse_int(value: str, what: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise UsageError(f"{what} must be an integer, not {value!r}") from None


def read_secret(path: str, what: str) -> bytes:
    """A secret from a file (trailing newline dropped); never echoed anywhere."""
    try:
        with open(path, "rb") as f:
            return f.read().rstrip(b"\r\n")
    except OSError as exc:
        raise UsageError(f"{what}: cannot read {path}: {exc.strerror}") from None
