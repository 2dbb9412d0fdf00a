"""stm-send: capture files, pipes or an interface in; STM reports out."""

from __future__ import annotations

import click

from stm import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="stm-send")
def main() -> None:
    """Send captured signalling as 3GPP STM reports."""


if __name__ == "__main__":
    main()
