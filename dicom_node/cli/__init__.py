"""The ``dicom-node`` command: serve, process, worker, status, retry, rules test, weights, cleanup, echo,
evaluate, demo-study, demo-model.

Exit statuses are ``ExitStatus`` (listed in ``--help`` and the README); ``serve`` has one
per ``StartupProblem``, with one line on stderr naming the config key and its value.

One module per group of commands: ``batch`` (process, rules test), ``jobs`` (status,
retry, cleanup), ``echo`` (the destinations answer?), ``models`` (worker, weights,
evaluate), ``demo`` (demo-study, demo-model) and ``review`` (list, approve, reject);
``serve`` is here. Each registers its
own sub-commands. A reader that closes stdout early (``| head``) ends any command
quietly (``main``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from dicom_node.cli import batch, demo, echo, jobs, models, pull
from dicom_node.cli import review
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
  6  serve: a TLS file (node.tls.*, destinations[].tls.*, destinations[].ca_certificates), a DICOMweb
     secret (destinations[].auth) or a status page token (http.ui_token_file, http.ui_read_token_file,
     http.ui_token_env, http.ui_read_token_env) cannot be read
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
    echo.register(commands)
    models.register(commands)
    demo.register(commands)
    review.register(commands)
    pull.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)  # --help and --version write too
        status = int(args.func(args))
        sys.stdout.flush()
        return status
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
    except BrokenPipeError:
        return _reader_gone()
    except SystemExit as exc:  # argparse after --help, --version or a usage error
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _reader_gone()
        raise


def _reader_gone() -> int:
    """The reader of stdout stopped early (``| head``): not an error, for every command.
    As the Python documentation recommends, the rest of the output goes to /dev/null, so
    that the interpreter's flush at exit does not fail again (and print a traceback)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return ExitStatus.OK
