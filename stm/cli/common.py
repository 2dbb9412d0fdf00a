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


def tls_options(*, receiver: bool):
    """The certificate options of tls://, dtls:// (and wss://) for either command:
    ``cert``, ``key``, ``ca``, ``key_password_file``, ``key_password_env``, then
    ``require_client_cert`` (receiver) or ``server_name`` (sender)."""
    peer = "producers' certificates" if receiver else "the collector's certificate"
    options = [
        click.option("--cert", type=click.Path(dir_okay=False), help="Our certificate (PEM)."),
        click.option("--key", type=click.Path(dir_okay=False), help="The key of --cert (PEM)."),
        click.option("--ca", type=click.Path(), help=f"CA bundle that {peer} must chain to."),
        click.option(
            "--key-password-file",
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help="Passphrase of an encrypted --key, read from FILE.",
        ),
        click.option(
            "--key-password-env", metavar="VAR", help="Passphrase of an encrypted --key, from $VAR."
        ),
    ]
    if receiver:
        options.append(
            click.option(
                "--require-client-cert",
                is_flag=True,
                help="Refuse producers without a certificate from --ca (mutual TLS).",
            )
        )
    else:
        options.append(
            click.option(
                "--server-name",
                metavar="NAME",
                help="Name the collector's certificate must carry (default: the URL's host).",
            )
        )

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def kafka_client_options(func):
    """``--kafka-option KEY=VALUE`` (``kafka_options``) and ``--kafka-config FILE``: what
    either command passes through to librdkafka (SASL, SSL and the like)."""
    func = click.option(
        "--kafka-config",
        type=click.Path(dir_okay=False),
        metavar="FILE",
        help="librdkafka properties from FILE (key=value lines): secrets off the command line.",
    )(func)
    return click.option(
        "--kafka-option",
        "kafka_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="A librdkafka property for kafka:// (SASL, SSL...); repeatable.",
    )(func)
