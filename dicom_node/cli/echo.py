"""``echo``: is each destination there? A C-ECHO to a DIMSE destination (with its TLS),
a QIDO-RS query to a DICOMweb one (with its credentials); a line per destination."""

from __future__ import annotations

import argparse
import sys

from dicom_node.cli.common import CONFIG_HELP, ExitStatus, load, unknown_destination
from dicom_node.logs import setup_logging

__all__ = ["register"]


def _cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.send.echo import echo  # here: the other commands need no DICOM network library

    config = load(args)
    # the outcome is the command's own line; pynetdicom's lines only at the config's DEBUG
    setup_logging("DEBUG" if config.logging.level == "DEBUG" else "WARNING", config.logging.format)
    destinations = config.destinations
    if args.destination is not None:
        destinations = tuple(d for d in destinations if d.name == args.destination)
        if not destinations:
            try:
                unknown_destination(config, args.destination)
            except ValueError as exc:
                print(f"dicom-node echo: {exc}", file=sys.stderr)
                return ExitStatus.CONFIG_ERROR
    failed = 0
    for destination in destinations:
        result = echo(destination, calling_ae_title=config.node.ae_title, timeout=args.timeout)
        failed += not result.ok
        print(result.line, flush=True)
    return ExitStatus.FAILURE if failed else ExitStatus.OK


def register(commands) -> None:
    """``echo``."""
    echo = commands.add_parser(
        "echo", help="check each destination: a C-ECHO (DIMSE) or a QIDO-RS query (DICOMweb); exit 1 if one fails")
    echo.add_argument("--destination", default=None, metavar="NAME", help="only this destination (as the config names it)")
    echo.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                      help="how long to wait for each destination (default: %(default)s)")
    echo.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    echo.set_defaults(func=_cmd_echo)
