"""``process`` (the pipeline over DICOM files, without network) and ``rules test``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from dicom_node.cli.common import CONFIG_HELP, ExitStatus, load, preset_named
from dicom_node.logs import setup_logging

__all__ = ["register"]


def _group_by_series(root: Path) -> dict[str, list[tuple[Path, object]]]:
    """Each series' files with their headers (no pixels): read once, for the grouping and
    for every later stage."""
    import pydicom  # here, not at the top: every command loads this module, most need no DICOM reader

    groups: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # not DICOM: README files, manifests
        uid = header.get("SeriesInstanceUID")
        if uid:
            groups[str(uid)].append((path, header))
    return groups


def _cmd_process(args: argparse.Namespace) -> int:
    from pipeline.model.runner import ModelRunner

    config = load(args)  # the same file and path rules as serve
    preset = preset_named(config, args.model)
    settings, outputs = config.pipeline_for(preset.name), config.output_requests
    setup_logging("WARNING" if not args.verbose else config.logging.level, config.logging.format)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    failures = 0
    # the model process starts first: its imports overlap the reading of the headers
    with ModelRunner(settings.model) as runner:
        groups = _group_by_series(Path(args.input))
        if not groups:
            print(f"no DICOM series found under {args.input}", file=sys.stderr)
            return ExitStatus.FAILURE
        failures = _process_groups(args, groups, settings, outputs, preset, config, runner, output)
    return ExitStatus.FAILURE if failures else ExitStatus.OK


def _process_groups(args, groups, settings, outputs, preset, config, runner, output: Path) -> int:
    """Each series through the pipeline on the warm runner; the number that failed."""
    from pipeline.errors import PipelineError
    from pipeline.model.segment import make_segmenter
    from pipeline.process import Outcome, classify_headers, process_series

    failures = 0
    with _Progress(len(groups), enabled=not args.json) as progress:
        segmenter = make_segmenter(settings.model, runner)
        for series_uid, headers in groups.items():
            progress.series(series_uid)
            paths = [path for path, _ in headers]
            record: dict = {"series_instance_uid": series_uid, "instances": len(paths)}
            try:
                result = process_series(paths, settings, segmenter, outputs, on_stage=progress.stage,
                                        series_headers=classify_headers(headers, settings),
                                        max_series_voxels=config.storage.max_series_voxels,
                                        **config.preset_marks(preset.name))
            except PipelineError as exc:
                failures += 1
                record.update(outcome="failed", reason=str(exc))
            else:
                record.update(outcome=result.outcome.value, reason=result.reason,
                              seconds={k: round(v, 3) for k, v in result.timing.items()})
                if result.outcome is Outcome.SEG:
                    saved = _save_objects(result.objects, output, series_uid)
                    record.update(saved, objects=saved, segments=list(result.segments))
            record["model_loads"] = runner.loads
            progress.done(record)
            if args.json:
                print(json.dumps(record), flush=True)
        if not args.json:
            print(f"{len(groups)} series, {failures} failed; the model was loaded {runner.loads} time(s)")
    return failures


def _cmd_rules_test(args: argparse.Namespace) -> int:
    """What the node would do with each series under the folder, without running a model."""
    from dicom_node.work.plan import check_series, plan_series
    from pipeline.errors import PipelineError
    from pipeline.process import classify_headers

    config = load(args)
    setup_logging("WARNING")
    groups = _group_by_series(Path(args.series_dir))
    if not groups:
        print(f"no DICOM series found under {args.series_dir}", file=sys.stderr)
        return ExitStatus.FAILURE
    for number, (series_uid, files) in enumerate(groups.items()):
        if len(groups) > 1:
            print(("\n" if number else "") + f"series {series_uid} ({len(files)} files)")
        try:
            headers = classify_headers(files, config.pipeline)
        except PipelineError as exc:
            print(f"cannot read the series: {exc}")
            continue
        plan = check_series(config, headers, plan_series(config, headers, args.calling_ae))
        print(plan.explanation)
    return ExitStatus.OK


def _save_objects(objects, output: Path, series_uid: str) -> dict[str, str]:
    """Each result object as ``SERIES.KEY.dcm`` (a folder ``SERIES.KEY/`` for an object of
    several instances, such as the overlay's images); the paths by object key, every
    object written (SEG, RTSTRUCT, overlay, report)."""
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
            lines = [f"{record['series_instance_uid']}: {record['outcome']}: {record['reason']}"]
            lines += [f"  wrote {key}: {path}" for key, path in record.get("objects", {}).items()]
            self.bar.write("\n".join(lines), file=sys.stdout)
        self.bar.update(1)


def register(commands) -> None:
    """``process`` and ``rules test``."""
    process = commands.add_parser("process", help="run the pipeline over DICOM files, without network")
    process.add_argument("input", help="folder searched recursively for DICOM series")
    process.add_argument("--output", required=True, help="folder for the SEG files")
    process.add_argument("--config", default="config.yaml", help=CONFIG_HELP + "; paths resolve as for serve")
    process.add_argument("--json", action="store_true", help="one JSON object per series and line, no progress bar")
    process.add_argument("--verbose", action="store_true", help="log at the config's level (default: warnings)")
    process.add_argument("--model", default=None, metavar="NAME", help="the model preset to run (default: the first)")
    process.set_defaults(func=_cmd_process)

    rules = commands.add_parser("rules", help="check the routing rules against a series, without running a model")
    rules_actions = rules.add_subparsers(dest="action", required=True, metavar="ACTION",
                                         help="test: check the rules against a series")
    rules_test = rules_actions.add_parser(
        "test", help="show the header fields, the classifier's decision, which rule matches and why,"
                     " and what would be made and sent")
    rules_test.add_argument("series_dir", metavar="SERIES_DIR", help="a folder with a series' DICOM files")
    rules_test.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    rules_test.add_argument("--calling-ae", default="", metavar="AE",
                            help="the calling AE title to assume (default: none)")
    rules_test.set_defaults(func=_cmd_rules_test)
