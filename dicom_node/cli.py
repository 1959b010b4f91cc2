"""The ``dicom-node`` command: serve, process, status, retry, weights, cleanup, evaluate, demo-study, demo-model.

Exit statuses are ``ExitStatus`` (listed in ``--help`` and the README); ``serve`` has one
per ``StartupProblem``, with one line on stderr naming the config key and its value.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from enum import IntEnum
from pathlib import Path

import pydicom

from dicom_node.config import Config, load_config
from dicom_node.errors import ConfigError
from dicom_node.logs import setup_logging
from dicom_node.state import Job, JobState, StateStore

__all__ = ["ExitStatus", "main"]


class ExitStatus(IntEnum):
    """The command's exit status; 3 to 7 are ``serve``'s start-up problems, by name."""

    OK = 0
    FAILURE = 1
    CONFIG_ERROR = 2
    PORT_IN_USE = 3
    PORT_NOT_PERMITTED = 4
    CANNOT_LISTEN = 5
    FILE_UNREADABLE = 6
    FOLDER_UNWRITABLE = 7


def _load(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.service import StartupError, serve

    config = _load(args)
    setup_logging(config.logging.level, config.logging.format)
    try:
        serve(config)
    except StartupError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return ExitStatus[exc.problem.name]
    return ExitStatus.OK


def _group_by_series(root: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:
            continue  # not DICOM: README files, manifests
        uid = header.get("SeriesInstanceUID")
        if uid:
            groups[str(uid)].append(path)
    return groups


def _cmd_process(args: argparse.Namespace) -> int:
    from pipeline.errors import PipelineError
    from pipeline.run import Outcome, process_series
    from pipeline.segment import make_segmenter
    from pipeline.settings import PipelineSettings

    from pipeline.seg_writer import SegOptions

    if args.config:
        config = _load(args)
        settings, seg_options = config.pipeline, config.destination.seg_options
        setup_logging(config.logging.level, config.logging.format)
    else:
        settings, seg_options = PipelineSettings(), SegOptions()  # relative paths: from the current folder
        setup_logging("WARNING")
    segmenter = make_segmenter(settings.model)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    groups = _group_by_series(Path(args.input))
    if not groups:
        print(f"no DICOM series found under {args.input}")
        return 1
    failures = 0
    for series_uid, paths in groups.items():
        try:
            result = process_series(paths, settings, segmenter, seg_options)
        except PipelineError as exc:
            failures += 1
            print(f"{series_uid}: failed: {exc}")
            continue
        if result.outcome is Outcome.SEG and result.seg is not None:
            target = output / f"{series_uid}.seg.dcm"
            result.seg.save_as(target, enforce_file_format=True)
            print(f"{series_uid}: seg {target}: {result.reason}: {', '.join(result.segments)}")
        else:
            print(f"{series_uid}: {result.outcome.value}: {result.reason}")
    return 1 if failures else 0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _job_json(job: Job, now: float) -> str:
    return json.dumps({
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "last_error": job.last_error,
        "attempts": job.attempts,
        "sequence_class": job.sequence_class,
        "preprocessing": job.preprocessing,
        "study_instance_uid": job.series.study_instance_uid,
        "series_instance_uid": job.series.series_instance_uid,
        "calling_ae_title": job.series.calling_ae_title,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "age_seconds": round(now - job.created_at, 1),
    })


def _status_lines(jobs: list[Job], as_json: bool, now: float) -> list[str]:
    if as_json:
        return [_job_json(job, now) for job in jobs]
    if not jobs:
        return ["no jobs"]
    lines = []
    for job_state in JobState:
        selected = [job for job in jobs if job.state is job_state]
        if not selected:
            continue
        lines.append(f"{job_state.value}: {len(selected)}")
        for job in selected:
            made = f" [{job.sequence_class or '?'}, {job.preprocessing or 'not segmented'}]" if job.sequence_class else ""
            last = f" (last error: {job.last_error})" if job.last_error and job.state is not JobState.FAILED else ""
            lines.append(f"  job {job.id} series {job.series.series_instance_uid} from {job.series.calling_ae_title}"
                         f" attempts {job.attempts}{made}: {job.reason or ''}{last}")
    return lines


def _cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    state = StateStore(config.storage.state_db)
    try:
        jobs = state.jobs()
    finally:
        state.close()
    now = time.time()
    if args.state:
        jobs = [job for job in jobs if job.state.value in args.state]
    if args.since is not None:
        jobs = [job for job in jobs if job.updated_at >= now - args.since]
    try:
        for line in _status_lines(jobs, args.json, now):
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped early (`| head`): not an error. Send the rest of the buffer
        # to /dev/null so that the interpreter's flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return ExitStatus.OK


def _cmd_retry(args: argparse.Namespace) -> int:
    config = _load(args)
    state = StateStore(config.storage.state_db)
    try:
        job = state.requeue(args.job_id)
    except (KeyError, ValueError) as exc:
        print(str(exc.args[0] if exc.args else exc), file=sys.stderr)
        return 2
    print(f"job {job.id} queued again as {job.state.value}; a running node picks it up")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from dicom_node.weights import WeightsError, import_weights, installed_models

    config = _load(args)
    weights_dir = config.pipeline.model.weights_dir
    if args.action == "import":
        try:
            models = import_weights(Path(args.path), weights_dir, dataset=args.dataset)
        except WeightsError as exc:
            print(f"weights import failed: {exc}", file=sys.stderr)
            return 1
        for model in models:
            print(f"installed {model.name} into {weights_dir}")
    models = installed_models(weights_dir)
    if not models:
        print(f"no models in {weights_dir}")
    for model in models:
        tasks = ", ".join(model.tasks) or "custom nnU-Net model"
        print(f"{model.name}  folds: {', '.join(model.folds)}  serves: {tasks}")
        for checkpoint, digest in sorted(model.checksums.items()):
            print(f"    {checkpoint}  sha256 {digest}")
        if not model.checksums:
            print("    (not imported with `weights import`: no checksums recorded)")
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from dicom_node.retention import expired, purge

    config = _load(args)
    state = StateStore(config.storage.state_db)
    items = expired(state, args.days if args.days is not None else config.retention.days)
    for item in items:
        paths = ", ".join(str(p) for p in item.paths) or "(no files left)"
        print(f"{'would delete' if args.dry_run else 'deleting'} job {item.job.id}"
              f" series {item.job.series.series_instance_uid}: {paths}")
    if not args.dry_run:
        purge(state, items)
    print(f"{len(items)} job(s) {'would be' if args.dry_run else 'were'} cleaned up")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_cases, write_reports
    from pipeline.preprocess import PreprocessingMode
    from pipeline.segment import make_segmenter
    from pipeline.settings import PipelineSettings

    settings = _load(args).pipeline if args.config else PipelineSettings()
    setup_logging("WARNING")
    modes = [mode.value for mode in PreprocessingMode]
    scores = evaluate_cases(Path(args.images), Path(args.references), settings,
                            make_segmenter(settings.model), modes)
    paths = write_reports(scores, modes, Path(args.output), args.title)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_demo_study(args: argparse.Namespace) -> int:
    from demo.phantom_study import write_phantom_study

    images, references = write_phantom_study(Path(args.output), cases_per_kind=args.cases, seed=args.seed)
    print(f"phantom study written: images {images}, references {references}")
    print(f"next: dicom-node evaluate {images} {references} --output REPORT_DIR")
    return 0


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from demo.phantom_model import train_phantom_model

    setup_logging("INFO")
    options = {"epochs": args.epochs} if args.epochs else {}
    folder = train_phantom_model(Path(args.output), seed=args.seed, **options)
    print(f"phantom model written to {folder} (synthetic, anatomically meaningless: for tests and demos only)")
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("dicom-node")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


_CONFIG_HELP = "the node's config file (default: %(default)s)"
_EPILOG = """exit statuses:
  0  success
  1  the command failed (a series, an import)
  2  the configuration is invalid, or the job cannot be retried
  3  serve: node.port or http.port is already in use
  4  serve: the port is not permitted (below 1024 without privileges)
  5  serve: cannot listen on the bind address
  6  serve: a TLS file (node.tls.*, destination.tls.*) cannot be read
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
    serve.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    serve.set_defaults(func=_cmd_serve)

    process = commands.add_parser("process", help="run the pipeline over DICOM files, without network")
    process.add_argument("input", help="folder searched recursively for DICOM series")
    process.add_argument("--output", required=True, help="folder for the SEG files")
    process.add_argument("--config", default=None, help="config file (default: built-in defaults)")
    process.set_defaults(func=_cmd_process)

    status = commands.add_parser("status", help="list jobs by state, with their reasons")
    status.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    status.add_argument("--json", action="store_true", help="one JSON object per job and line")
    status.add_argument("--state", action="append", choices=[s.value for s in JobState], metavar="STATE",
                        help="only jobs in this state (repeatable): " + ", ".join(s.value for s in JobState))
    status.add_argument("--since", type=float, default=None, metavar="SECONDS",
                        help="only jobs that changed in the last SECONDS seconds")
    status.set_defaults(func=_cmd_status)

    retry = commands.add_parser("retry", help="queue a failed job again")
    retry.add_argument("job_id", type=int, help="the job's id, as `status` shows it")
    retry.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    retry.set_defaults(func=_cmd_retry)

    weights = commands.add_parser("weights", help="import and list model weights (offline)")
    weights_actions = weights.add_subparsers(dest="action", required=True, metavar="ACTION",
                                             help="import or list")
    weights_import = weights_actions.add_parser("import", help="check and install a weights archive or folder")
    weights_import.add_argument("path", help="a weights archive (zip, tar) or folder")
    weights_import.add_argument("--dataset", default=None, help="DatasetNNN_Name for a bare trainer folder")
    weights_import.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    weights_list = weights_actions.add_parser("list", help="installed models, their checksums and tasks")
    weights_list.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    weights.set_defaults(func=_cmd_weights)

    cleanup = commands.add_parser("cleanup", help="delete series and SEGs of jobs sent longer ago than retention.days")
    cleanup.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    cleanup.add_argument("--days", type=float, default=None, help="override retention.days")
    cleanup.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    cleanup.set_defaults(func=_cmd_cleanup)

    evaluate = commands.add_parser("evaluate", help="score every preprocessing mode against references")
    evaluate.add_argument("images", help="folder with one subfolder (a DICOM series) per case")
    evaluate.add_argument("references", help="folder with CASE.dcm (SEG) or CASE.nii.gz + CASE.json per case")
    evaluate.add_argument("--output", required=True, help="folder for the reports (Markdown and CSV tables, a chart)")
    evaluate.add_argument("--config", default=None, help="config file (default: built-in defaults)")
    evaluate.add_argument("--title", default="Mean DSC", help="title of the report table (default: %(default)s)")
    evaluate.set_defaults(func=_cmd_evaluate)

    study = commands.add_parser("demo-study", help="write T1/T2 phantom series and references for evaluate")
    study.add_argument("--output", required=True, help="folder for the images and references")
    study.add_argument("--cases", type=int, default=2, help="phantoms per kind (head, trunk)")
    study.add_argument("--seed", type=int, default=1234, help="random seed (default: %(default)s)")
    study.set_defaults(func=_cmd_demo_study)

    demo = commands.add_parser("demo-model", help="train the synthetic phantom model (tests and demos only)")
    demo.add_argument("--output", required=True, help="weights folder (becomes TOTALSEG_WEIGHTS_PATH)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the trainer's)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(func=_cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
