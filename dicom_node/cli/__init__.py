"""The ``dicom-node`` command: serve, process, worker, status, retry, rules test, weights, cleanup, evaluate,
demo-study, demo-model.

Exit statuses are ``ExitStatus`` (listed in ``--help`` and the README); ``serve`` has one
per ``StartupProblem``, with one line on stderr naming the config key and its value.

One module per group of commands: ``batch`` (process, rules test), ``jobs`` (status,
retry, cleanup), ``models`` (worker, weights, evaluate) and ``demo`` (demo-study,
demo-model); ``serve`` is here. Each registers its own sub-commands.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from dicom_node.cli import batch, demo, jobs, models
from dicom_node.cli.common import CONFIG_HELP, ExitStatus, load
from dicom_node.errors import ConfigError
from dicom_node.logs import setup_logging

__all__ = ["ExitStatus", "main"]


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.service import StartupError, serve

    config = load(args)
    setup_logging(config.logging.level, config.logging.format)
    try:
        serve(config)
    except StartupError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return ExitStatus[exc.problem.name]
    return ExitStatus.OK


def _version() -> str:
    try:
        return importlib.metadata.version("dicom-node")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


_EPILOG = """exit statuses:
  0  success
  1  the command failed (a series, an import)
  2  the configuration is invalid, or the job cannot be retried
  3  serve: node.port or http.port is already in use
  4  serve: the port is not permitted (below 1024 without privileges)
  5  serve: cannot listen on the bind address
  6  serve: a TLS file (node.tls.*, destination.tls.*) or http.ui_token_file cannot be read
  7  serve: storage.spool_dir or storage.state_db cannot be written"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description="A DICOM node: receives MR series,"
                                     " segments them and sends DICOM SEGs back.", epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="one of the commands below")

    serve = commands.add_parser("serve", help="run the DICOM node")
    serve.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    serve.set_defaults(func=_cmd_serve)

    batch.register(commands)
    jobs.register(commands)
    models.register(commands)
    demo.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
