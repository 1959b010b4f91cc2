"""``demo-study`` and ``demo-model``: the synthetic phantom, for tests and demos.

The ``demo`` package they use is not in the production image; it is imported only
when one of these commands runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.logs import setup_logging

__all__ = ["register"]


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


def register(commands) -> None:
    """``demo-study`` and ``demo-model``."""
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
