"""``pull``: retrieve studies from a PACS (``sources``) into the node.

It runs in its own process against the node's state store and spool (as ``retry``
does); the running node's queue processes and sends the jobs it makes, and with C-MOVE
the running node's SCP receives the instances. SIGTERM (or Ctrl-C) stops it; run again
with the same arguments, it resumes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from dicom_node.cli.common import CONFIG_HELP, ExitStatus, load
from dicom_node.logs import setup_logging

__all__ = ["register"]


def _cmd_pull(args: argparse.Namespace) -> int:
    from dicom_node.audit import Audit
    from dicom_node.pull.common import PullError, PullFilter
    from dicom_node.pull.puller import Puller, PullProgress, pull_progress, pull_settled
    from dicom_node.store.spool import Spool
    from dicom_node.store.state import StateStore

    config = load(args)
    setup_logging(config.logging.level if args.verbose else "WARNING", config.logging.format)
    if not config.sources:
        print("dicom-node pull: the configuration has no sources", file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
    try:
        source = config.source(args.source) if args.source else config.sources[0]
    except KeyError:
        names = ", ".join(s.name for s in config.sources)
        print(f"dicom-node pull: no source {args.source!r}; sources are: {names}", file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
    try:
        filters = PullFilter(study_uid=args.study, accession=args.accession, patient_id=args.patient_id,
                             date=args.date, modality=args.modality, series_description=args.series_description)
    except ValueError as exc:
        print(f"dicom-node pull: {exc}", file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    state = StateStore(config.storage.state_db)
    audit = Audit(config.audit, ae_title=config.node.ae_title) if config.audit.enabled else Audit.off()
    audit.start()
    try:
        puller = Puller(config, source, state, Spool(config.storage.spool_dir), audit=audit)
        if args.dry_run:
            return _dry_run(puller, filters, args.json)
        with _Bar(enabled=not args.json) as bar:
            def show(event: str, progress: PullProgress) -> None:
                if args.json:
                    print(json.dumps({"event": event, **progress.record()}), flush=True)
                else:
                    bar.show(progress)

            progress = puller.run(filters, reprocess=args.reprocess, stop=stop, on_progress=show)
            key = filters.key(source.name)
            if args.wait is not None and not stop.is_set():
                deadline = time.monotonic() + args.wait
                while not pull_settled(puller.pulls, key) and time.monotonic() < deadline and not stop.wait(1.0):
                    show("waiting", pull_progress(puller.pulls, key))
                progress = pull_progress(puller.pulls, key)
                show("done", progress)
    except PullError as exc:
        print(f"dicom-node pull: {exc}", file=sys.stderr)
        return ExitStatus.FAILURE
    finally:
        audit.close()
        state.close()
    if stop.is_set():
        print("dicom-node pull: stopped; run it again with the same arguments to resume", file=sys.stderr)
        return ExitStatus.FAILURE
    return ExitStatus.FAILURE if progress.failed else ExitStatus.OK


def _dry_run(puller, filters, as_json: bool) -> int:
    planned = puller.plan(filters)
    for item in planned:
        record = item.record()
        if as_json:
            print(json.dumps(record), flush=True)
        else:
            action = "retrieve" if record["retrieve"] else "leave"
            print(f"{action}: study {record['study_instance_uid']} ({record['study_date'] or 'no date'}) series"
                  f" {record['series_instance_uid']} {record['modality']} {record['series_description']!r}"
                  f" ({record['instances'] if record['instances'] is not None else '?'} instances): "
                  f"{record['decision']}")
    if not planned:
        print("no series found", file=sys.stderr)
    return ExitStatus.OK


class _Bar:
    """A progress bar over the series to retrieve: found, retrieved, processed, sent (stderr)."""

    def __init__(self, *, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="series", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                        desc="retrieved")

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def show(self, progress) -> None:
        self.bar.total = progress.to_retrieve
        self.bar.n = progress.retrieved
        paused = f", paused until {progress.paused_until}" if progress.paused_until else ""
        failed = f", failed {progress.failed}" if progress.failed else ""
        self.bar.set_postfix_str(f"found {progress.found}, processed {progress.processed},"
                                 f" sent {progress.sent}{failed}{paused}")
        self.bar.refresh()


def register(commands) -> None:
    """``pull``."""
    pull = commands.add_parser("pull", help="retrieve studies from a PACS (sources) into the node")
    pull.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    pull.add_argument("--source", metavar="NAME", help="the source to pull from (default: the first)")
    pull.add_argument("--study", metavar="UID", help="StudyInstanceUID")
    pull.add_argument("--accession", metavar="N", help="AccessionNumber")
    pull.add_argument("--patient-id", metavar="ID", help="PatientID")
    pull.add_argument("--date", metavar="FROM-TO", help="StudyDate range, YYYYMMDD-YYYYMMDD (an end may be left open)")
    pull.add_argument("--modality", metavar="MOD", help="series Modality, e.g. MR")
    pull.add_argument("--series-description", metavar="REGEX", help="SeriesDescription, a regular expression")
    pull.add_argument("--dry-run", action="store_true",
                      help="list each series and the rules' decision; retrieve nothing")
    pull.add_argument("--reprocess", action="store_true", help="pull series already pulled with this configuration")
    pull.add_argument("--wait", nargs="?", type=float, const=3600.0, default=None, metavar="SECONDS",
                      help="after retrieving, wait until the series are processed and sent (default at most 3600 s)")
    pull.add_argument("--json", action="store_true", help="one JSON line per change (or per series with --dry-run)")
    pull.add_argument("--verbose", action="store_true", help="log at the config's level (default: warnings)")
    pull.set_defaults(func=_cmd_pull)
