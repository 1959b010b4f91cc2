"""What the node will do with one series, decided before any model runs.

``plan_series`` puts the config's pieces together: the series' facts and the
classifier's verdict (``pipeline.routing.rules.series_facts``), the routing rules
(``pipeline.routing.rules.route``; without a ``rules`` key every model preset runs and every
destination receives), each chosen preset's policy (its preprocessing, or a skip with
the reason), and the destinations with the objects each receives. The worker follows
the ``Plan`` and records ``Plan.explanation`` on the job; ``dicom-node rules test``
prints the same explanation for a folder, without running a model. It is pure: the
headers come in already read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dicom_node.config import Config, Destination
from pipeline.errors import PipelineError, TooFewSlicesError
from pipeline.input.preprocess import PreprocessingMode
from pipeline.input.series import assemble_series
from pipeline.input.volume import check_size
from pipeline.input.wholeness import known_missing, placement_of
from pipeline.outputs.options import OutputRequest, distinct
from pipeline.process import SeriesHeaders, preprocessing_for
from pipeline.routing.facts import series_facts
from pipeline.routing.rules import Routing, SeriesFacts, route

__all__ = ["ModelPlan", "Plan", "plan_series", "check_series", "requests_for"]

_FIELDS = (
    ("modality", "Modality"), ("body_part_examined", "BodyPartExamined"), ("series_description", "SeriesDescription"),
    ("study_description", "StudyDescription"), ("protocol_name", "ProtocolName"), ("manufacturer", "Manufacturer"),
    ("magnetic_field_strength", "MagneticFieldStrength (T)"), ("slice_thickness", "SliceThickness (mm)"),
    ("calling_ae_title", "calling AE title"),
)


@dataclass(frozen=True)
class ModelPlan:
    """One model preset the rules chose: its preprocessing, or why its policy skips the series."""

    preset: str
    mode: PreprocessingMode | None
    reason: str

    @property
    def runs(self) -> bool:
        return self.mode is not None


@dataclass(frozen=True)
class Plan:
    """What happens to one series: the facts it was routed by, the rules' decision, the
    presets chosen (each running or skipped by its policy) and the destinations."""

    facts: SeriesFacts
    routing: Routing
    models: tuple[ModelPlan, ...]
    destinations: tuple[Destination, ...]
    result_keys: dict[str, tuple[str, ...]]  # destination name -> the object keys it receives
    # what the series checks that need no model found (``check_series``): a failure, or a skip
    series_problem: str | None = None
    series_skip: str | None = None

    @property
    def running(self) -> tuple[ModelPlan, ...]:
        return tuple(model for model in self.models if model.runs)

    @property
    def skip_reason(self) -> str | None:
        """Why no model runs (None: at least one does)."""
        if self.routing.skip_reason is not None:
            return self.routing.skip_reason
        if self.series_skip is not None:
            return self.series_skip
        if self.running:
            return None
        if len(self.models) == 1:
            return self.models[0].reason
        return "; ".join(f"model {m.preset}: {m.reason}" for m in self.models)

    @property
    def explanation(self) -> str:
        """The header fields, the classifier's verdict, each rule's outcome and what
        would be produced and sent: the text ``rules test`` prints and the job records."""
        facts = self.facts
        lines = ["header fields:"]
        for attribute, label in _FIELDS:
            value = getattr(facts, attribute)
            lines.append(f"  {label}: {'(missing)' if value in (None, '') else value}")
        anatomical = "an anatomical 3D image" if facts.anatomical else "not an anatomical 3D image"
        lines += [f"classifier: {facts.sequence_class.value}, {anatomical} ({facts.classification_reason})", "rules:"]
        lines += [f"  {line}" for line in self.routing.explanation]
        if self.skip_reason is not None:
            lines.append(f"decision: skip: {self.skip_reason}")
            return "\n".join(lines)
        if self.series_problem is not None:
            lines.append(f"decision: fail: {self.series_problem} (found without running a model)")
            return "\n".join(lines)
        lines.append("decision:")
        for model in self.models:
            lines.append(f"  model {model.preset}: {'runs, ' if model.runs else ''}{model.reason}")
        for destination in self.destinations:
            keys = ", ".join(self.result_keys[destination.name])
            lines.append(f"  send to {destination.name} ({destination.peer}): {keys}")
        return "\n".join(lines)


def _default_routing() -> Routing:
    line = "no rules configured: every model preset runs, every destination receives"
    return Routing((), (), None, None, (line,))


def plan_series(config: Config, series: SeriesHeaders, calling_ae_title: str) -> Plan:
    """Decide which presets run on the series and where their results go."""
    headers = series.images or [ds for _, ds in series.headers]  # no image: route by what there is
    facts = series_facts(headers, series.classification, calling_ae_title)
    ruleset = config.ruleset
    routing = _default_routing() if ruleset is None else route(ruleset, facts)
    if routing.skipped:
        return Plan(facts, routing, (), (), {})
    names = routing.models or tuple(preset.name for preset in config.models)
    models = []
    for name in names:
        mode, reason = preprocessing_for(config.pipeline_for(name), series.classification)
        models.append(ModelPlan(name, mode, reason))
    destinations = tuple(
        d for d in config.destinations if routing.destinations is None or d.name in routing.destinations)
    running = [m.preset for m in models if m.runs]
    result_keys = {d.name: tuple(config.result_key(preset, request) for preset in running for request in d.requests)
                   for d in destinations}
    return Plan(facts, routing, tuple(models), destinations, result_keys)


def check_series(config: Config, series: SeriesHeaders, plan: Plan) -> Plan:
    """The plan with what the series checks that need no model find, as the processor
    would meet them: slices known missing (a gap in the positions, fewer images than the
    headers announce), the geometry of the stack (orientations, spacing, a missing
    slice), too few slices for a volume (a skip), or too many voxels to decode. For
    ``rules test``; a plan whose models do not run is returned as it is."""
    if plan.skip_reason is not None:
        return plan
    missing = known_missing(placement_of(ds) for _, ds in series.headers)
    if missing is not None:
        return dataclasses.replace(plan, series_problem=f"the series is not whole: {missing}")
    settings = config.pipeline_for(plan.running[0].preset)
    try:
        assembled = assemble_series(series.headers, min_slices=settings.min_slices, four_d=settings.four_d)
        check_size(assembled, config.storage.max_series_voxels)
    except TooFewSlicesError as exc:
        return dataclasses.replace(plan, series_skip=f"not a volume: {exc}")
    except PipelineError as exc:
        return dataclasses.replace(plan, series_problem=str(exc))
    return plan


def requests_for(plan: Plan) -> list[OutputRequest]:
    """Every object some chosen destination receives, each once."""
    return distinct(request for destination in plan.destinations for request in destination.requests)
