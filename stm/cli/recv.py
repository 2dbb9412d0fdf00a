"""stm-recv: STM reports in; one merged pcapng out."""

from __future__ import annotations

import click

from stm import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="stm-recv")
def main() -> None:
    """Receive 3GPP STM reports and rebuild the packets into pcapng."""


if __name__ == "__main__":
    main()
