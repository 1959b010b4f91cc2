"""``worker`` (a GPU worker), ``weights`` (offline import and list) and ``evaluate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicom_node.cli.common import CONFIG_HELP, load, preset_named
from dicom_node.errors import ConfigError
from dicom_node.logs import setup_logging

__all__ = ["register"]


def _slots(text: str) -> int:
    """``--slots``: 1 or more (as ``workers.slots``)."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.remote.worker import run_worker

    config = load(args)
    setup_logging(config.logging.level, config.logging.format)
    return run_worker(config, name=args.name, slots=args.slots)


def _cmd_weights(args: argparse.Namespace) -> int:
    from dicom_node.weights import WeightsError, import_weights, installed_models

    config = load(args)
    weights_dir = preset_named(config, args.model).weights_dir
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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from pipeline.evaluation.evaluate import Arm, evaluate_cases, evaluate_presets, write_preset_reports, write_reports
    from pipeline.evaluation.label_groups import mapping_for
    from pipeline.input.preprocess import PreprocessingMode
    from pipeline.model.segment import make_segmenter
    from pipeline.settings import PipelineSettings

    config = load(args) if args.config else None
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
        presets = list(dict.fromkeys(preset_named(config, name).name for name in args.model))
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


def register(commands) -> None:
    """``worker``, ``weights`` and ``evaluate``."""
    worker = commands.add_parser("worker", help="run a GPU worker for workers.backend celery (one per GPU)")
    worker.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    worker.add_argument("--name", default=None, help="the worker's name (default: dicom-node-PID@HOST)")
    worker.add_argument("--slots", type=_slots, default=None,
                        help="series run at once, each with its own warm model process (default: workers.slots)")
    worker.set_defaults(func=_cmd_worker)

    weights = commands.add_parser("weights", help="import and list model weights (offline)")
    weights_actions = weights.add_subparsers(dest="action", required=True, metavar="ACTION",
                                             help="import or list")
    weights_import = weights_actions.add_parser("import", help="check and install a weights archive or folder")
    weights_import.add_argument("path", help="a weights archive (zip, tar) or folder")
    weights_import.add_argument("--dataset", default=None, help="DatasetNNN_Name for a bare trainer folder")
    weights_import.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    weights_import.add_argument("--model", default=None, metavar="NAME",
                       help="the model preset whose weights_dir to use (default: the first)")
    weights_list = weights_actions.add_parser("list", help="installed models, their checksums and tasks")
    weights_list.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    weights_list.add_argument("--model", default=None, metavar="NAME",
                       help="the model preset whose weights_dir to use (default: the first)")
    weights.set_defaults(func=_cmd_weights)

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
