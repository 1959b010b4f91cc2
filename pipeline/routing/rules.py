"""Where a received series goes: ordered, declarative routing rules.

The node runs each series through zero or more model presets and sends the results to
some or all destinations. Which ones is decided by an ordered list of rules in the
config, each a ``match`` (conditions on the series' headers, the calling AE title and the
classifier's verdict) and an action (``models`` and ``destinations``, or ``skip``):

* Rules are evaluated in order; the first rule that matches decides, unless it says
  ``continue: true``: then the following rules are evaluated too, and every further
  matching rule adds its models and destinations (in order, without duplicates), until
  a matching rule without ``continue`` ends the evaluation.
* All conditions of a ``match`` must hold; an empty ``match`` matches every series. A
  condition on a value the series lacks (no SliceThickness, say) does not hold.
* No matching rule means the series is skipped, with a reason naming why each rule did
  not match. A matching ``skip: true`` rule skips the series too (no models run, even
  those an earlier ``continue`` rule named), with its ``reason``.
* ``destinations`` left out means all configured destinations.
* Declarative only: strings are compared, regular expressions are searched
  (Python ``re.search``, case-insensitive) and numbers compared; nothing from the config
  is evaluated as code.

``route`` also explains itself: one line per rule, saying which conditions matched, or
the first condition that failed with the series' value and what the rule expected, or
that it was not evaluated because an earlier rule decided. Rules are numbered from 1 in
these lines (``rules[0]`` is "rule 1"). The facts hold no patient names, IDs or birth
dates (``series_facts`` masks them where a scanner copied them into a description), so
the explanation can go into logs and job records.

Example (the ``rules`` list of a ``RuleSet``)::

    rules:
      - name: no-localizers
        match: {series_description: "localizer|scout|survey"}
        skip: true
        reason: localizers are not segmented
      - name: t1-brain
        match:
          modality: MR
          body_part_examined: [BRAIN, HEAD]
          sequence_class: T1
          anatomical: true
          slice_thickness: {max: 3}       # mm, inclusive
        models: [total, brain]
        continue: true                    # the rules below may add models
      - name: research-scanner
        match:
          calling_ae_title: [PRISMA_RES]
          magnetic_field_strength: {min: 2.9, max: 3.1}   # tesla
        models: [brain]
        destinations: [research_pacs]     # left out: all destinations
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipeline.input.classify import SequenceClass

__all__ = ["SeriesFacts", "Range", "Match", "Rule", "RuleSet", "RuleMatch", "Routing", "route"]


# --- the facts a rule can match ---------------------------------------------------------


@dataclass(frozen=True)
class SeriesFacts:
    """What rules can match, read from one series (no patient names or IDs)."""

    modality: str
    body_part_examined: str
    series_description: str
    study_description: str
    protocol_name: str
    manufacturer: str
    magnetic_field_strength: float | None  # tesla
    slice_thickness: float | None  # mm
    calling_ae_title: str
    sequence_class: SequenceClass  # the string form ("T1", "other") is accepted
    anatomical: bool
    classification_reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequence_class", SequenceClass(self.sequence_class))


# --- the config ----------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_or_many(value):
    return (value,) if isinstance(value, str) else value


_Names = Annotated[tuple[str, ...], BeforeValidator(_one_or_many)]
_Classes = Annotated[tuple[SequenceClass, ...], BeforeValidator(_one_or_many)]


def _number_text(value: float) -> str:
    return f"{value:g}"


class Range(_Frozen):
    """An inclusive range of numbers; either end may be left out, not both."""

    min: float | None = Field(None, allow_inf_nan=False)
    max: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounds(self) -> "Range":
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {_number_text(self.min)} is above max {_number_text(self.max)}")
        return self

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self, unit: str) -> str:
        if self.min is not None and self.max is not None:
            return f"{_number_text(self.min)} to {_number_text(self.max)} {unit}"
        if self.min is not None:
            return f"at least {_number_text(self.min)} {unit}"
        return f"at most {_number_text(self.max)} {unit}"  # type: ignore[arg-type]


_UNITS = {"magnetic_field_strength": "T", "slice_thickness": "mm"}


class Match(_Frozen):
    """Conditions on a series, all of which must hold; a key left out is no condition.

    ``modality`` and ``body_part_examined``: one value or a list, exact, case-insensitive.
    ``manufacturer``, ``series_description``, ``study_description``, ``protocol_name``:
    a regular expression searched case-insensitively. ``calling_ae_title``: one or a
    list, exact (after stripping spaces). ``sequence_class``: one or a list of T1, T2,
    PD, other (the classifier's verdict). ``anatomical``: the classifier found an
    anatomical 3D image. ``magnetic_field_strength`` (T), ``slice_thickness`` (mm): a
    ``Range``.
    """

    modality: _Names | None = None
    body_part_examined: _Names | None = None
    manufacturer: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    protocol_name: str | None = None
    calling_ae_title: _Names | None = None
    sequence_class: _Classes | None = None
    anatomical: bool | None = None
    magnetic_field_strength: Range | None = None
    slice_thickness: Range | None = None

    @field_validator("modality", "body_part_examined", "calling_ae_title")
    @classmethod
    def _names(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if value is None:
            return None
        stripped = tuple(v.strip() for v in value)
        if not stripped or any(not v for v in stripped):
            raise ValueError(f"{info.field_name} needs one or more non-empty values")
        return stripped

    @field_validator("sequence_class")
    @classmethod
    def _classes(cls, value: tuple[SequenceClass, ...] | None) -> tuple[SequenceClass, ...] | None:
        if value is not None and not value:
            raise ValueError("sequence_class needs one or more of T1, T2, PD, other")
        return value

    @field_validator("manufacturer", "series_description", "study_description", "protocol_name")
    @classmethod
    def _regex(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        try:
            re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"{info.field_name}: {value!r} is not a valid regular expression: {exc}") from exc
        return value

    def conditions(self, facts: SeriesFacts) -> Iterator[tuple[bool, str]]:
        """Each condition in order: whether it holds, and a line saying so (or why not)."""
        for field in ("modality", "body_part_examined"):
            wanted = getattr(self, field)
            if wanted is not None:
                actual = getattr(facts, field)
                ok = actual.casefold() in {w.casefold() for w in wanted}
                yield ok, (f"{field} {actual}" if ok else f"{field} {_shown(actual)} is not {_choices(wanted)}")
        for field in ("manufacturer", "series_description", "study_description", "protocol_name"):
            pattern = getattr(self, field)
            if pattern is not None:
                actual = getattr(facts, field)
                ok = re.search(pattern, actual, re.IGNORECASE) is not None
                yield ok, (f"{field} {actual!r}" if ok else f"{field} {_shown(actual)} does not match /{pattern}/i")
        if self.calling_ae_title is not None:
            actual = facts.calling_ae_title
            ok = actual in self.calling_ae_title
            yield ok, (f"calling_ae_title {actual}" if ok
                       else f"calling_ae_title {_shown(actual)} is not {_choices(self.calling_ae_title)}")
        if self.sequence_class is not None:
            actual = facts.sequence_class
            ok = actual in self.sequence_class
            wanted = _choices(tuple(c.value for c in self.sequence_class))
            yield ok, (f"sequence_class {actual.value}" if ok else
                       f"sequence_class {actual.value} is not {wanted} (classifier: {facts.classification_reason})")
        if self.anatomical is not None:
            ok = facts.anatomical == self.anatomical
            shown = "true" if facts.anatomical else "false"
            yield ok, (f"anatomical {shown}" if ok else
                       f"anatomical is {shown}, the rule needs {str(self.anatomical).lower()}"
                       f" (classifier: {facts.classification_reason})")
        for field in ("magnetic_field_strength", "slice_thickness"):
            wanted_range: Range | None = getattr(self, field)
            if wanted_range is not None:
                yield _range_condition(field, getattr(facts, field), wanted_range)

    def first_mismatch(self, facts: SeriesFacts) -> str | None:
        """Why the series does not match (the first failing condition), or None when it does."""
        return next((line for ok, line in self.conditions(facts) if not ok), None)


def _range_condition(field: str, actual: float | None, wanted: Range) -> tuple[bool, str]:
    unit = _UNITS[field]
    if actual is None:
        return False, f"{field} is missing or unreadable, the rule needs {wanted.describe(unit)}"
    shown = f"{_number_text(actual)} {unit}"
    if wanted.contains(actual):
        return True, f"{field} {shown}"
    if wanted.min is not None and actual < wanted.min:
        return False, f"{field} {shown} is below the minimum {_number_text(wanted.min)} {unit}"
    return False, f"{field} {shown} is above the maximum {_number_text(wanted.max)} {unit}"  # type: ignore[arg-type]


def _shown(value: str) -> str:
    return repr(value) if value else "(empty)"


def _choices(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else "one of " + ", ".join(values)


def _unique(values: tuple[str, ...], what: str) -> tuple[str, ...]:
    stripped = tuple(v.strip() for v in values)
    if any(not v for v in stripped):
        raise ValueError(f"{what} must be non-empty names")
    repeated = sorted({v for v in stripped if stripped.count(v) > 1})
    if repeated:
        raise ValueError(f"{what} names {', '.join(repeated)} more than once")
    return stripped


class Rule(_Frozen):
    """One routing rule: when ``match`` holds, run ``models`` and send to ``destinations``
    (None: all), or skip the series (``skip: true``, with a ``reason``). ``continue``
    (``continue_`` in Python) lets the following rules add to the result."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1)
    match: Match = Match()
    models: tuple[str, ...] = ()
    destinations: tuple[str, ...] | None = None
    continue_: bool = Field(False, alias="continue")
    skip: bool = False
    reason: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name must not be blank")
        return value.strip()

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(value, "models")

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("destinations must name one or more destinations, or be left out for all")
        return _unique(value, "destinations")

    @model_validator(mode="after")
    def _action(self) -> "Rule":
        if self.skip:
            if self.models or self.destinations is not None:
                raise ValueError("a skip rule runs no models and sends nothing: remove models and destinations")
            if self.continue_:
                raise ValueError("a skip rule ends the evaluation: continue cannot be true")
        else:
            if not self.models:
                raise ValueError("models must name one or more model presets (or set skip: true)")
            if self.reason is not None:
                raise ValueError("reason is for skip rules only")
        return self


class RuleSet(_Frozen):
    """The ordered routing rules; names are unique."""

    rules: tuple[Rule, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> "RuleSet":
        first: dict[str, int] = {}
        for index, rule in enumerate(self.rules):
            if rule.name in first:
                raise ValueError(f'rules[{index}] (name "{rule.name}"): name already used by rules[{first[rule.name]}]')
            first[rule.name] = index
        return self

    def check_references(self, models: Collection[str], destinations: Collection[str]) -> None:
        """Refuse rules naming a model preset or destination that the config lacks."""
        problems = []
        for index, rule in enumerate(self.rules):
            where = f'rules[{index}] (name "{rule.name}")'
            problems += [f'{where}: unknown model "{m}"; models are: {_listing(models)}'
                         for m in rule.models if m not in models]
            problems += [f'{where}: unknown destination "{d}"; destinations are: {_listing(destinations)}'
                         for d in rule.destinations or () if d not in destinations]
        if problems:
            raise ValueError("\n".join(problems))


def _listing(names: Collection[str]) -> str:
    ordered = sorted(names) if isinstance(names, (set, frozenset)) else list(names)
    return ", ".join(ordered) if ordered else "(none configured)"


# --- evaluation ------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleMatch:
    """A rule that applies to the series: its position in ``RuleSet.rules`` (from 0), the
    rule, and the conditions that matched."""

    index: int
    rule: Rule
    conditions: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.rule.name


@dataclass(frozen=True)
class Routing:
    """What to do with a series. ``destinations`` None means all; ``skip_reason`` set
    means no model runs (``models`` is then empty)."""

    matched: tuple[RuleMatch, ...]
    models: tuple[str, ...]
    destinations: tuple[str, ...] | None
    skip_reason: str | None
    explanation: tuple[str, ...]

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None


def route(rules: RuleSet, facts: SeriesFacts) -> Routing:
    """Evaluate ``rules`` in order against ``facts`` (see the module docstring)."""
    matched: list[RuleMatch] = []
    explanation: list[str] = []
    failures: list[str] = []
    decided: int | None = None
    for index, rule in enumerate(rules.rules):
        label = f'rule {index + 1} "{rule.name}"'
        if decided is not None:
            explanation.append(f"{label}: not evaluated (rule {decided + 1} decided)")
            continue
        conditions = list(rule.match.conditions(facts))
        failure = next((line for ok, line in conditions if not ok), None)
        if failure is not None:
            explanation.append(f"{label}: does not match: {failure}")
            failures.append(f"{label}: {failure}")
            continue
        lines = tuple(line for _, line in conditions)
        matched.append(RuleMatch(index, rule, lines))
        explanation.append(f"{label}: matches ({', '.join(lines) or 'no conditions'}); {_action(rule)}")
        if rule.skip or not rule.continue_:
            decided = index

    skip_rule = next((m for m in matched if m.rule.skip), None)
    if skip_rule is not None:
        why = f': {skip_rule.rule.reason}' if skip_rule.rule.reason else ""
        return Routing(tuple(matched), (), (), f'skipped by rule {skip_rule.index + 1} "{skip_rule.name}"{why}',
                       tuple(explanation))
    if not matched:
        why = "; ".join(failures) if failures else "no rules are configured"
        return Routing((), (), (), f"no routing rule matches: {why}", tuple(explanation))

    models = tuple(dict.fromkeys(m for match in matched for m in match.rule.models))
    destinations: tuple[str, ...] | None
    if any(match.rule.destinations is None for match in matched):
        destinations = None
    else:
        destinations = tuple(dict.fromkeys(d for match in matched for d in match.rule.destinations or ()))
    return Routing(tuple(matched), models, destinations, None, tuple(explanation))


def _action(rule: Rule) -> str:
    if rule.skip:
        return f"skip ({rule.reason})" if rule.reason else "skip"
    sent = "all destinations" if rule.destinations is None else "destinations " + ", ".join(rule.destinations)
    return f"models {', '.join(rule.models)} to {sent}" + ("; continue" if rule.continue_ else "")
