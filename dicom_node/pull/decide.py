"""The rules at series level, before anything is retrieved.

A series found by a query is decided from its series-level attributes (and its
study's) exactly as the node decides a received series (``work.plan.plan_series``: the
classifier, the routing rules, each chosen preset's policy): a series they skip (a
localizer, a T2 under the default policy, a series that is not MR) is never retrieved.
When the source did not return what the classifier needs (``NEEDED``: ImageType,
RepetitionTime, EchoTime), the series is retrieved and the node decides after receipt,
as for a pushed series: nothing is skipped on a guess.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Config
from dicom_node.pull.common import SeriesFound
from dicom_node.work.plan import plan_series
from pipeline.input.classify import classify_series
from pipeline.process import SeriesHeaders

__all__ = ["Decision", "decide", "NEEDED", "config_digest"]

NEEDED = ("ImageType", "RepetitionTime", "EchoTime")


@dataclass(frozen=True)
class Decision:
    """Whether to retrieve the series, and why (one line); ``explanation``: the rules'
    full text (as ``rules test`` prints it), when they could decide."""

    retrieve: bool
    reason: str
    explanation: str = ""


def decide(config: Config, series: SeriesFound, calling_ae_title: str) -> Decision:
    attributes = series.attributes
    modality = series.modality.upper()
    if modality and modality != "MR":
        return Decision(False, f"modality {modality}: only MR images are processed")
    missing = [keyword for keyword in NEEDED if attributes.get(keyword) in (None, "")]
    if missing:
        return Decision(True, f"undecided: the source did not return {', '.join(missing)} at series level;"
                              " the node decides after receipt")
    rules = [rule.rule() for rule in config.pipeline.class_rules]
    classification = classify_series([attributes], rules)
    plan = plan_series(config, SeriesHeaders([(Path(), attributes)], classification), calling_ae_title)
    if plan.skip_reason is not None:
        return Decision(False, f"skip: {plan.skip_reason}", plan.explanation)
    running = ", ".join(model.preset for model in plan.running)
    return Decision(True, f"process ({classification.sequence_class.value}; model {running})", plan.explanation)


def config_digest(config: Config) -> str:
    """What decides a series' result: models, rules, pipeline and destinations. A series
    pulled and completed with the same digest is not pulled again (``--reprocess`` does)."""
    parts = {
        "models": [preset.model_dump(mode="json") for preset in config.models],
        "rules": None if config.rules is None else [rule.model_dump(mode="json") for rule in config.rules],
        "pipeline": config.pipeline.model_dump(mode="json"),
        "destinations": [destination.model_dump(mode="json") for destination in config.destinations],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
