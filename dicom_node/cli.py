"""The ``dicom-node`` command: serve, process, worker, status, retry, rules test, weights, cleanup, evaluate,
demo-study, demo-model.

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
from dicom_node.store.state import Job, JobState, OutboxCounts, OutboxItem, OutboxState, StateStore

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
    from pipeline.model.runner import ModelRunner
    from pipeline.model.segment import make_segmenter
    from pipeline.process import Outcome, process_series

    config = _load(args)  # the same file and path rules as serve
    preset = _preset(config, args.model)
    settings, outputs = config.pipeline_for(preset.name), config.output_requests
    setup_logging("WARNING" if not args.verbose else config.logging.level, config.logging.format)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    groups = _group_by_series(Path(args.input))
    if not groups:
        print(f"no DICOM series found under {args.input}", file=sys.stderr)
        return ExitStatus.FAILURE
    failures = 0
    with ModelRunner(settings.model) as runner, _Progress(len(groups), enabled=not args.json) as progress:
        segmenter = make_segmenter(settings.model, runner)
        for series_uid, paths in groups.items():
            progress.series(series_uid)
            record: dict = {"series_instance_uid": series_uid, "instances": len(paths)}
            try:
                result = process_series(paths, settings, segmenter, outputs, on_stage=progress.stage,
                                        **config.preset_marks(preset.name))
            except PipelineError as exc:
                failures += 1
                record.update(outcome="failed", reason=str(exc))
            else:
                record.update(outcome=result.outcome.value, reason=result.reason,
                              seconds={k: round(v, 3) for k, v in result.seconds.items()})
                if result.outcome is Outcome.SEG:
                    record.update(_save_objects(result.objects, output, series_uid), segments=list(result.segments))
            record["model_loads"] = runner.loads
            progress.done(record)
            if args.json:
                print(json.dumps(record), flush=True)
        if not args.json:
            print(f"{len(groups)} series, {failures} failed; the model was loaded {runner.loads} time(s)")
    return ExitStatus.FAILURE if failures else ExitStatus.OK


def _preset(config: Config, name: str | None):
    """The model preset called ``name`` (the first one when None); ``ConfigError`` naming the presets."""
    if name is None:
        return config.models[0]
    try:
        return config.preset(name)
    except KeyError:
        raise ConfigError(f"no model preset {name!r}; models are: {', '.join(m.name for m in config.models)}") from None


def _cmd_rules_test(args: argparse.Namespace) -> int:
    """What the node would do with each series under the folder, without running a model."""
    from dicom_node.work.plan import plan_series
    from pipeline.errors import PipelineError
    from pipeline.process import read_series

    config = _load(args)
    setup_logging("WARNING")
    groups = _group_by_series(Path(args.series_dir))
    if not groups:
        print(f"no DICOM series found under {args.series_dir}", file=sys.stderr)
        return ExitStatus.FAILURE
    for number, (series_uid, paths) in enumerate(groups.items()):
        if len(groups) > 1:
            print(("\n" if number else "") + f"series {series_uid} ({len(paths)} files)")
        try:
            headers = read_series(paths, config.pipeline)
        except PipelineError as exc:
            print(f"cannot read the series: {exc}")
            continue
        print(plan_series(config, headers, args.calling_ae).explanation)
    return ExitStatus.OK


def _save_objects(objects, output: Path, series_uid: str) -> dict[str, str]:
    """Each result object as ``SERIES.KEY.dcm`` (``SERIES.overlay/`` for the overlay's
    images); the paths by object key."""
    saved = {}
    for obj in objects:
        if len(obj.datasets) == 1:
            target = output / f"{series_uid}.{obj.key}.dcm"
            obj.datasets[0].save_as(target, enforce_file_format=True)
        else:
            target = output / f"{series_uid}.{obj.key}"
            target.mkdir(exist_ok=True)
            for ds in obj.datasets:
                ds.save_as(target / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        saved[obj.key] = str(target)
    return saved


class _Progress:
    """A progress bar over the series, naming the stage the current one is in (stderr)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        from tqdm import tqdm

        self.enabled = enabled
        self.bar = tqdm(total=total, unit="series", file=sys.stderr, disable=not enabled, dynamic_ncols=True)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def series(self, uid: str) -> None:
        self.current = uid[-12:]
        self.bar.set_postfix_str(f"...{self.current}: reading")

    def stage(self, name: str) -> None:
        self.bar.set_postfix_str(f"...{self.current}: {name}")

    def done(self, record: dict) -> None:
        if self.enabled:  # with --json the caller writes the record itself
            line = f"{record['series_instance_uid']}: {record['outcome']}"
            if record.get("seg"):
                line += f" {record['seg']}"
            self.bar.write(f"{line}: {record['reason']}", file=sys.stdout)
        self.bar.update(1)


def _cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.remote.worker import run_worker

    config = _load(args)
    setup_logging(config.logging.level, config.logging.format)
    return run_worker(config, name=args.name)


def _job_json(job: Job, now: float, outbox=()) -> str:
    from dicom_node.web.status_page import job_record

    return json.dumps(job_record(job, now, outbox))


def _timeline(job: Job) -> str:
    """When the job passed each stage, and how long each took (UTC)."""
    def at(timestamp: float | None) -> str:
        return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"

    def took(seconds: float | None) -> str:
        return "" if seconds is None else f" ({seconds:.1f}s)"

    stages = job.stage_seconds()
    parts = [f"received {at(job.received_at)}", f"completed {at(job.completed_at)}{took(stages['receiving'])}"]
    if job.processing_at is not None:
        parts.append(f"processing {at(job.processing_at)} (queued {stages['queued']:.1f}s)"
                     if stages["queued"] is not None else f"processing {at(job.processing_at)}")
    if job.processed_at is not None:
        parts.append(f"processed {at(job.processed_at)}{took(stages['processing'])}")
    if job.sent_at is not None:
        parts.append(f"sent {at(job.sent_at)}{took(stages['sending'])}")
    return "UTC " + ", ".join(parts)


def _status_lines(jobs: list[Job], as_json: bool, now: float,
                  outboxes: dict[int, list[OutboxItem]] | None = None) -> list[str]:
    outboxes = outboxes or {}
    if as_json:
        return [_job_json(job, now, outboxes.get(job.id, ())) for job in jobs]
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
            again = f" (again from job {job.reprocess_of})" if job.reprocess_of else ""
            lines.append(f"  job {job.id}{again} series {job.series.series_instance_uid} from"
                         f" {job.series.calling_ae_title} attempts {job.attempts}{made}: {job.reason or ''}{last}")
            lines.append(f"      {_timeline(job)}")
            if job.model_run:
                lines.append(f"      model: {job.model_run}")
            if job.state in (JobState.SENDING, JobState.FAILED) and outboxes.get(job.id):
                lines.append("      sends: " + ", ".join(_send_text(item, now) for item in outboxes[job.id]))
    return lines


def _send_text(item: OutboxItem, now: float) -> str:
    text = f"{item.object} to {item.destination} {item.state.value}"
    if item.state is OutboxState.PENDING and item.attempts:
        text += f" (attempt {item.attempts} failed, next in {max(item.next_attempt_at - now, 0):.0f}s)"
    return text


def _destination_lines(config: Config, counts: dict[str, OutboxCounts]) -> list[str]:
    """The outbox of each configured destination (and of any the config no longer names)."""
    lines = []
    for destination in config.destinations:
        row = counts.get(destination.name, OutboxCounts())
        lines.append(f"destination {destination.name} ({destination.peer}; {', '.join(destination.outputs)}):"
                     f" {row.pending} pending, {row.sent} sent, {row.failed} failed")
    for name in sorted(set(counts) - {d.name for d in config.destinations}):
        row = counts[name]
        lines.append(f"destination {name} (no longer configured): {row.pending} pending, {row.sent} sent,"
                     f" {row.failed} failed")
    return lines


def _workers_line(config: Config, jobs: list[Job]) -> str:
    """Where the model runs, the series in flight and the queue in front of it."""
    in_flight = sum(job.state is JobState.PROCESSING for job in jobs)
    waiting = sum(job.state is JobState.RECEIVED for job in jobs)
    if config.workers.backend == "celery":
        from dicom_node.remote.client import queue_depth

        depth = queue_depth(config.workers)
        queued = "Redis unreachable" if depth is None else f"{depth} task(s) in the Redis queue"
        return (f"workers: celery (queue {config.workers.queue}), {in_flight} series in flight of at most"
                f" {config.workers.max_in_flight}, {queued}, {waiting} job(s) waiting in the node")
    return f"workers: embedded warm runner, {in_flight} series in flight, {waiting} job(s) waiting"


def _cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    state = StateStore(config.storage.state_db)
    try:
        jobs = every_job = state.jobs()
        outboxes = state.outboxes()
        counts = state.outbox_counts()
    finally:
        state.close()
    now = time.time()
    if args.state:
        jobs = [job for job in jobs if job.state.value in args.state]
    if args.since is not None:
        jobs = [job for job in jobs if job.updated_at >= now - args.since]
    lines = _status_lines(jobs, args.json, now, outboxes)
    if not args.json:
        lines[:0] = [_workers_line(config, every_job), *_destination_lines(config, counts)]
    try:
        for line in lines:
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
        if args.destination is not None and args.destination not in {d.name for d in config.destinations}:
            _unknown_destination(config, args.destination)
        if args.reprocess:
            if args.destination is not None:
                raise ValueError("--reprocess makes every result again for every destination; leave out --destination")
            job = state.reprocess(args.job_id)
        else:
            old = state.job(args.job_id)
            if old is not None and old.state in (JobState.SENT, JobState.SKIPPED, JobState.NO_RESULT):
                raise ValueError(f"job {args.job_id} is {old.state.value}; `dicom-node retry --reprocess"
                                 f" {args.job_id}` processes its series again")
            job = state.requeue(args.job_id, destination=args.destination)
    except (KeyError, ValueError) as exc:
        print(str(exc.args[0] if exc.args else exc), file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
    finally:
        state.close()
    if job.id != args.job_id:
        print(f"job {args.job_id} queued again as job {job.id} ({job.state.value}); a running node picks it up")
    else:
        print(f"job {job.id} queued again as {job.state.value}; a running node picks it up")
    return ExitStatus.OK


def _unknown_destination(config, name: str) -> None:
    names = ", ".join(d.name for d in config.destinations)
    raise ValueError(f"no destination {name!r} in the configuration; it has {names}")


def _cmd_weights(args: argparse.Namespace) -> int:
    from dicom_node.weights import WeightsError, import_weights, installed_models

    config = _load(args)
    weights_dir = _preset(config, args.model).weights_dir
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
    from dicom_node.store.retention import expired, purge

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
    from contextlib import ExitStack

    from pipeline.evaluation.evaluate import Arm, evaluate_cases, evaluate_presets, write_preset_reports, write_reports
    from pipeline.evaluation.label_groups import mapping_for
    from pipeline.input.preprocess import PreprocessingMode
    from pipeline.model.segment import make_segmenter
    from pipeline.settings import PipelineSettings

    config = _load(args) if args.config else None
    if args.model and config is None:
        raise ConfigError("--model names a preset of the config's models: give --config too")
    setup_logging("WARNING")
    images, references, output = Path(args.images), Path(args.references), Path(args.output)
    if not args.model:  # one model (the first preset) under every preprocessing mode
        settings = config.pipeline_for(config.models[0].name) if config else PipelineSettings()
        modes = [mode.value for mode in PreprocessingMode]
        segmenter = make_segmenter(settings.model)  # one warm model for every case and mode
        try:
            scores = evaluate_cases(images, references, settings, segmenter, modes)
        finally:
            segmenter.close()
        paths = write_reports(scores, modes, output, args.title)
    else:
        presets = list(dict.fromkeys(_preset(config, name).name for name in args.model))
        with ExitStack() as stack:  # one warm model per preset for every case, all closed at the end
            arms = []
            for name in presets:
                settings = config.pipeline_for(name)
                segmenter = make_segmenter(settings.model)
                stack.callback(segmenter.close)
                arms.append(Arm(segmenter, settings, preset=name))
            names = mapping_for(arm.settings.model for arm in arms)
            evaluation = evaluate_presets(images, references, arms, names)
        paths = write_preset_reports(evaluation, presets, output, args.title, names)
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
    from demo.phantom_model import (
        make_full_total_weights,
        make_kidney_model,
        make_total_mr_weights,
        train_phantom_model,
    )

    setup_logging("INFO")
    if args.full_from or args.kidney_from or args.total_mr_from:  # derived from a fast phantom, no training
        if args.full_from:
            for folder in make_full_total_weights(Path(args.full_from), Path(args.output)):
                print(f"phantom part-model written to {folder}")
            print("(synthetic, anatomically meaningless, TotalSegmentator 'total' full task: for tests and demos only)")
        if args.kidney_from:
            folder = Path(args.output) / make_kidney_model(Path(args.kidney_from), Path(args.output))
            print(f"phantom kidney model written to {folder}")
            print("(synthetic, anatomically meaningless custom nnU-Net model: its 'kidney' labels are the"
                  " phantom's brain, skull and spinal cord; for tests and demos only)")
        if args.total_mr_from:
            for folder in make_total_mr_weights(Path(args.total_mr_from), Path(args.output)):
                print(f"phantom total_mr model written to {folder}")
            print("(synthetic, anatomically meaningless, TotalSegmentator 'total_mr' fast task: for tests and"
                  " demos only)")
        return 0
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
    serve.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    serve.set_defaults(func=_cmd_serve)

    process = commands.add_parser("process", help="run the pipeline over DICOM files, without network")
    process.add_argument("input", help="folder searched recursively for DICOM series")
    process.add_argument("--output", required=True, help="folder for the SEG files")
    process.add_argument("--config", default="config.yaml", help=_CONFIG_HELP + "; paths resolve as for serve")
    process.add_argument("--json", action="store_true", help="one JSON object per series and line, no progress bar")
    process.add_argument("--verbose", action="store_true", help="log at the config's level (default: warnings)")
    process.add_argument("--model", default=None, metavar="NAME", help="the model preset to run (default: the first)")
    process.set_defaults(func=_cmd_process)

    worker = commands.add_parser("worker", help="run a GPU worker for workers.backend celery (one per GPU)")
    worker.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    worker.add_argument("--name", default=None, help="the worker's name (default: dicom-node-PID@HOST)")
    worker.set_defaults(func=_cmd_worker)

    status = commands.add_parser("status", help="list jobs by state, with their reasons")
    status.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    status.add_argument("--json", action="store_true", help="one JSON object per job and line")
    status.add_argument("--state", action="append", choices=[s.value for s in JobState], metavar="STATE",
                        help="only jobs in this state (repeatable): " + ", ".join(s.value for s in JobState))
    status.add_argument("--since", type=float, default=None, metavar="SECONDS",
                        help="only jobs that changed in the last SECONDS seconds")
    status.set_defaults(func=_cmd_status)

    retry = commands.add_parser("retry", help="queue a failed job again (--reprocess: any ended job)")
    retry.add_argument("job_id", type=int, help="the job's id, as `status` shows it")
    retry.add_argument("--reprocess", action="store_true",
                       help="process the job's series again as a new job, whatever its outcome (sent, skipped,"
                            " no_result, failed), for example after a policy change")
    retry.add_argument("--destination", default=None, metavar="NAME",
                       help="only the sends to this destination (as the config names it)")
    retry.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    retry.set_defaults(func=_cmd_retry)

    rules = commands.add_parser("rules", help="check the routing rules against a series, without running a model")
    rules_actions = rules.add_subparsers(dest="action", required=True, metavar="ACTION",
                                         help="test: check the rules against a series")
    rules_test = rules_actions.add_parser(
        "test", help="show the header fields, the classifier's decision, which rule matches and why,"
                     " and what would be made and sent")
    rules_test.add_argument("series_dir", metavar="SERIES_DIR", help="a folder with a series' DICOM files")
    rules_test.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    rules_test.add_argument("--calling-ae", default="", metavar="AE",
                            help="the calling AE title to assume (default: none)")
    rules_test.set_defaults(func=_cmd_rules_test)

    weights = commands.add_parser("weights", help="import and list model weights (offline)")
    weights_actions = weights.add_subparsers(dest="action", required=True, metavar="ACTION",
                                             help="import or list")
    weights_import = weights_actions.add_parser("import", help="check and install a weights archive or folder")
    weights_import.add_argument("path", help="a weights archive (zip, tar) or folder")
    weights_import.add_argument("--dataset", default=None, help="DatasetNNN_Name for a bare trainer folder")
    weights_import.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    weights_import.add_argument("--model", default=None, metavar="NAME",
                       help="the model preset whose weights_dir to use (default: the first)")
    weights_list = weights_actions.add_parser("list", help="installed models, their checksums and tasks")
    weights_list.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    weights_list.add_argument("--model", default=None, metavar="NAME",
                       help="the model preset whose weights_dir to use (default: the first)")
    weights.set_defaults(func=_cmd_weights)

    cleanup = commands.add_parser("cleanup", help="delete series and SEGs of jobs sent longer ago than retention.days")
    cleanup.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    cleanup.add_argument("--days", type=float, default=None, help="override retention.days")
    cleanup.add_argument("--config", default="config.yaml", help=_CONFIG_HELP)
    cleanup.set_defaults(func=_cmd_cleanup)

    evaluate = commands.add_parser("evaluate", help="score every preprocessing mode, or model presets side by side,"
                                   " against references")
    evaluate.add_argument("images", help="folder with one subfolder (a DICOM series) per case")
    evaluate.add_argument("references", help="folder with CASE.dcm (SEG) or CASE.nii.gz + CASE.json per case")
    evaluate.add_argument("--output", required=True, help="folder for the reports (Markdown and CSV tables, a chart)")
    evaluate.add_argument("--config", default=None, help="config file (default: built-in defaults)")
    evaluate.add_argument("--title", default="Mean DSC", help="title of the report table (default: %(default)s)")
    evaluate.add_argument("--model", action="append", default=[], metavar="NAME",
                          help="a model preset of the config (repeat to compare several), each under its own"
                               " policy (default: the first preset under every preprocessing mode)")
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
    demo.add_argument("--full-from", metavar="FAST_WEIGHTS_DIR", default=None,
                      help="instead of training: derive the full 'total' task's five part-models from the"
                           " fast phantom model in FAST_WEIGHTS_DIR")
    demo.add_argument("--kidney-from", metavar="FAST_WEIGHTS_DIR", default=None,
                      help="instead of training: derive a synthetic custom nnU-Net kidney/kidney-tumour model"
                           " (labels.csv included) from the fast phantom model in FAST_WEIGHTS_DIR")
    demo.add_argument("--total-mr-from", metavar="FAST_WEIGHTS_DIR", default=None,
                      help="instead of training: derive TotalSegmentator's 'total_mr' fast model from the"
                           " fast phantom model in FAST_WEIGHTS_DIR")
    demo.set_defaults(func=_cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
