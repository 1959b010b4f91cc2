"""Routing rules: each condition matching and not, the order of evaluation, the config's
validation, and the facts read from real series of the shared data."""

import copy
import re
import textwrap
from pathlib import Path

import pydicom
import pytest
import yaml
from pydantic import ValidationError
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

import pipeline.routing.rules
from pipeline.input.classify import SequenceClass, classify_series
from pipeline.process import read_image_headers
from pipeline.routing.facts import series_facts
from pipeline.routing.rules import Match, Range, Rule, RuleSet, SeriesFacts, route
from tests.conftest import patient_strings

T1_SERIES = "t1_siemens_3t_fl2d_sag_hfs"  # MANIFEST: Siemens Prisma 3T FLASH T1, 4 mm slices
T2_SERIES = "t2_siemens_3t_tse_ax_adi"  # MANIFEST: Siemens Trio 3T TSE T2, 2.5 mm slices


def _header(root: Path, folder: str) -> pydicom.Dataset:
    path = sorted((root / folder).glob("*.dcm"))[0]
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.fixture(scope="module")
def t1_header(mri_dir) -> pydicom.Dataset:
    return _header(mri_dir, T1_SERIES)


@pytest.fixture(scope="module")
def t2_header(mri_dir) -> pydicom.Dataset:
    return _header(mri_dir, T2_SERIES)


def _facts(header: pydicom.Dataset, calling_ae_title: str = "MODALITY", **changes) -> SeriesFacts:
    """Facts of a copy of ``header`` with attributes changed (None deletes one)."""
    ds = copy.deepcopy(header)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return series_facts([ds], classify_series([ds], []), calling_ae_title)


def _one_rule(match: dict, **rule) -> RuleSet:
    return RuleSet.model_validate({"rules": [{"name": "only", "match": match, "models": ["total"], **rule}]})


def test_the_chosen_series_are_what_the_manifest_says(mri_dir, t1_header, t2_header):
    manifest = (mri_dir / "MANIFEST.md").read_text()
    assert f"`{T1_SERIES}` | Siemens Prisma 3T 2D FLASH T1" in manifest
    assert f"`{T2_SERIES}` | Siemens Trio 3T 2D TSE T2" in manifest
    t1, t2 = _facts(t1_header), _facts(t2_header)
    assert (t1.sequence_class, t1.anatomical, t1.slice_thickness, t1.magnetic_field_strength) == (
        SequenceClass.T1, True, 4.0, 3.0)
    assert (t2.sequence_class, t2.anatomical, t2.slice_thickness) == (SequenceClass.T2, True, 2.5)
    assert (t1.modality, t1.body_part_examined, t1.manufacturer) == ("MR", "BRAIN", "SIEMENS")
    assert (t1.series_description, t1.protocol_name) == ("t1_fl2d_sag", "t1_fl2d_sag")


# Each matchable field, matching and not, on the real T1 header (MR, BRAIN, SIEMENS,
# 't1_fl2d_sag', study 'Rorden^Rorden_Prisma', 3 T, 4 mm, classified T1 anatomical),
# with header changes and the calling AE. Expected None: matches; else the exact reason.
CASES = [
    # modality: exact, case-insensitive, one or a list
    ({"modality": "MR"}, {}, None),
    ({"modality": "mr"}, {}, None),
    ({"modality": ["CT", "MR"]}, {}, None),
    ({"modality": "CT"}, {}, "modality 'MR' is not CT"),
    ({"modality": ["CT", "PT"]}, {}, "modality 'MR' is not one of CT, PT"),
    ({"modality": "MR"}, {"Modality": None}, "modality (empty) is not MR"),
    # body_part_examined
    ({"body_part_examined": "brain"}, {}, None),
    ({"body_part_examined": ["HEAD", "BRAIN"]}, {}, None),
    ({"body_part_examined": "KNEE"}, {}, "body_part_examined 'BRAIN' is not KNEE"),
    ({"body_part_examined": ["ABDOMEN", "PELVIS"]}, {}, "body_part_examined 'BRAIN' is not one of ABDOMEN, PELVIS"),
    ({"body_part_examined": "BRAIN"}, {"BodyPartExamined": None}, "body_part_examined (empty) is not BRAIN"),
    # manufacturer: regex, case-insensitive
    ({"manufacturer": "siemens"}, {}, None),
    ({"manufacturer": "^Siemens( Healthineers)?$"}, {}, None),
    ({"manufacturer": "philips|^ge"}, {}, "manufacturer 'SIEMENS' does not match /philips|^ge/i"),
    # series_description
    ({"series_description": "T1"}, {}, None),
    ({"series_description": r"fl2d_(sag|tra)"}, {}, None),
    ({"series_description": "t1"}, {"SeriesDescription": "t2_tse_tra"},
     "series_description 't2_tse_tra' does not match /t1/i"),
    ({"series_description": "t1"}, {"SeriesDescription": None}, "series_description (empty) does not match /t1/i"),
    # study_description
    ({"study_description": "PRISMA"}, {}, None),
    ({"study_description": "abdomen"}, {}, "study_description 'Rorden^Rorden_Prisma' does not match /abdomen/i"),
    # protocol_name
    ({"protocol_name": "FL2D"}, {}, None),
    ({"protocol_name": "mprage"}, {}, "protocol_name 't1_fl2d_sag' does not match /mprage/i"),
    # calling_ae_title: exact after strip, one or a list
    ({"calling_ae_title": "MODALITY"}, {}, None),
    ({"calling_ae_title": ["SCANNER1", " MODALITY "]}, {}, None),
    ({"calling_ae_title": "SCANNER1"}, {}, "calling_ae_title 'MODALITY' is not SCANNER1"),
    ({"calling_ae_title": "modality"}, {}, "calling_ae_title 'MODALITY' is not modality"),
    # magnetic_field_strength (3 T): inclusive range, below / inside / above / missing
    ({"magnetic_field_strength": {"min": 2.9, "max": 3.1}}, {}, None),
    ({"magnetic_field_strength": {"min": 3, "max": 3}}, {}, None),
    ({"magnetic_field_strength": {"min": 3}}, {}, None),
    ({"magnetic_field_strength": {"max": 1.5}}, {}, "magnetic_field_strength 3 T is above the maximum 1.5 T"),
    ({"magnetic_field_strength": {"min": 7}}, {}, "magnetic_field_strength 3 T is below the minimum 7 T"),
    ({"magnetic_field_strength": {"min": 1}}, {"MagneticFieldStrength": None},
     "magnetic_field_strength is missing or unreadable, the rule needs at least 1 T"),
    # slice_thickness (4 mm)
    ({"slice_thickness": {"min": 1, "max": 5}}, {}, None),
    ({"slice_thickness": {"max": 4}}, {}, None),
    ({"slice_thickness": {"max": 3}}, {}, "slice_thickness 4 mm is above the maximum 3 mm"),
    ({"slice_thickness": {"min": 5, "max": 8}}, {}, "slice_thickness 4 mm is below the minimum 5 mm"),
    ({"slice_thickness": {"min": 1, "max": 5}}, {"SliceThickness": None},
     "slice_thickness is missing or unreadable, the rule needs 1 to 5 mm"),
]


@pytest.mark.parametrize("match, changes, reason", CASES, ids=[
    f"{next(iter(m))}-{'match' if r is None else 'no'}-{i}" for i, (m, _, r) in enumerate(CASES)])
def test_each_field_matches_and_not(t1_header, match, changes, reason):
    routing = route(_one_rule(match), _facts(t1_header, **changes))
    if reason is None:
        assert routing.models == ("total",) and routing.skip_reason is None, routing.explanation
        assert routing.explanation[0].startswith('rule 1 "only": matches (')
    else:
        assert routing.models == () and routing.matched == ()
        assert routing.explanation == (f'rule 1 "only": does not match: {reason}',)
        assert routing.skip_reason == f'no routing rule matches: rule 1 "only": {reason}'


@pytest.mark.parametrize("wanted, folder, matches", [
    ("T1", T1_SERIES, True),
    (["T2", "PD"], T2_SERIES, True),
    ("T2", T2_SERIES, True),
    ("T1", T2_SERIES, False),
    (["T2", "other"], T1_SERIES, False),
])
def test_sequence_class_from_the_real_classifier(mri_dir, wanted, folder, matches):
    facts = _facts(_header(mri_dir, folder))
    routing = route(_one_rule({"sequence_class": wanted}), facts)
    assert bool(routing.matched) is matches
    if matches:
        assert f"sequence_class {facts.sequence_class.value}" in routing.explanation[0]
    else:
        # The classifier's reason comes with the verdict, for the operator to check it.
        assert re.search(rf"does not match: sequence_class {facts.sequence_class.value} is not .* \(classifier: ",
                         routing.explanation[0])
        assert facts.classification_reason in routing.explanation[0]


@pytest.mark.parametrize("wanted, image_type, matches", [
    (True, ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"], True),
    (False, ["ORIGINAL", "PRIMARY", "LOCALIZER"], True),
    (False, ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"], False),
    (True, ["ORIGINAL", "PRIMARY", "LOCALIZER"], False),
])
def test_anatomical_from_the_real_classifier(t1_header, wanted, image_type, matches):
    facts = _facts(t1_header, ImageType=image_type)
    routing = route(_one_rule({"anatomical": wanted}), facts)
    assert bool(routing.matched) is matches, routing.explanation
    if not matches:
        shown = str(facts.anatomical).lower()
        assert f"does not match: anatomical is {shown}, the rule needs {str(wanted).lower()}" in routing.explanation[0]


def test_all_conditions_must_hold_and_the_first_failing_one_is_named(t1_header):
    match = {"modality": "MR", "series_description": "t1", "slice_thickness": {"max": 3}, "manufacturer": "philips"}
    routing = route(_one_rule(match), _facts(t1_header))
    # Fields are checked in a fixed order (manufacturer before slice_thickness).
    assert routing.explanation == ('rule 1 "only": does not match: manufacturer \'SIEMENS\' does not match /philips/i',)


def test_a_matching_rule_lists_what_matched(t1_header):
    match = {"modality": "MR", "sequence_class": "T1", "anatomical": True, "slice_thickness": {"max": 5},
             "calling_ae_title": "MODALITY"}
    routing = route(_one_rule(match, destinations=["pacs"]), _facts(t1_header))
    assert routing.explanation == (
        'rule 1 "only": matches (modality MR, calling_ae_title MODALITY, sequence_class T1, anatomical true,'
        ' slice_thickness 4 mm); models total to destinations pacs',)
    assert routing.matched[0].conditions == ("modality MR", "calling_ae_title MODALITY", "sequence_class T1",
                                             "anatomical true", "slice_thickness 4 mm")


def test_an_empty_match_matches_everything(t1_header, t2_header):
    rules = RuleSet.model_validate({"rules": [{"name": "all", "models": ["total"]}]})
    for header in (t1_header, t2_header):
        routing = route(rules, _facts(header))
        assert routing.models == ("total",)
        assert routing.explanation == ('rule 1 "all": matches (no conditions); models total to all destinations',)


# --- order of evaluation ----------------------------------------------------------------

TWO_RULES = {"rules": [
    {"name": "t1-brain", "match": {"sequence_class": "T1", "series_description": "t1"}, "models": ["total", "brain"]},
    {"name": "any-mr", "match": {"modality": "MR"}, "models": ["total"], "destinations": ["research"]},
]}


def test_the_first_match_wins(t1_header):
    routing = route(RuleSet.model_validate(TWO_RULES), _facts(t1_header))
    assert [m.name for m in routing.matched] == ["t1-brain"]
    assert routing.models == ("total", "brain") and routing.destinations is None
    assert routing.explanation == (
        'rule 1 "t1-brain": matches (series_description \'t1_fl2d_sag\', sequence_class T1);'
        ' models total, brain to all destinations',
        'rule 2 "any-mr": not evaluated (rule 1 decided)',
    )


def test_a_t2_series_falls_through_to_the_second_rule(t2_header):
    routing = route(RuleSet.model_validate(TWO_RULES), _facts(t2_header))
    assert [(m.index, m.name) for m in routing.matched] == [(1, "any-mr")]
    assert routing.models == ("total",) and routing.destinations == ("research",)
    assert routing.explanation == (
        'rule 1 "t1-brain": does not match: series_description \'AX FSE T2\' does not match /t1/i',
        'rule 2 "any-mr": matches (modality MR); models total to destinations research',
    )


def test_continue_collects_models_in_order_without_duplicates(t1_header):
    rules = RuleSet.model_validate({"rules": [
        {"name": "brain", "match": {"body_part_examined": "BRAIN"}, "models": ["total", "brain"],
         "destinations": ["pacs"], "continue": True},
        {"name": "knee", "match": {"body_part_examined": "KNEE"}, "models": ["knee"]},  # no match: skipped over
        {"name": "siemens", "match": {"manufacturer": "siemens"}, "models": ["brain", "vessels"],
         "destinations": ["research", "pacs"]},
        {"name": "late", "models": ["never"]},
    ]})
    routing = route(rules, _facts(t1_header))
    assert [m.name for m in routing.matched] == ["brain", "siemens"]
    assert routing.models == ("total", "brain", "vessels")
    assert routing.destinations == ("pacs", "research")
    assert routing.skip_reason is None
    assert routing.explanation[0].endswith("; models total, brain to destinations pacs; continue")
    assert routing.explanation[1] == 'rule 2 "knee": does not match: body_part_examined \'BRAIN\' is not KNEE'
    assert routing.explanation[3] == 'rule 4 "late": not evaluated (rule 3 decided)'


def test_continue_to_a_rule_for_all_destinations_sends_to_all(t1_header):
    rules = RuleSet.model_validate({"rules": [
        {"name": "a", "models": ["total"], "destinations": ["pacs"], "continue": True},
        {"name": "b", "models": ["brain"]},
    ]})
    routing = route(rules, _facts(t1_header))
    assert routing.models == ("total", "brain") and routing.destinations is None


def test_continue_on_the_last_match_ends_without_a_decider(t1_header):
    rules = RuleSet.model_validate({"rules": [
        {"name": "a", "models": ["total"], "continue": True},
        {"name": "b", "match": {"modality": "CT"}, "models": ["ct"]},
    ]})
    routing = route(rules, _facts(t1_header))
    assert routing.models == ("total",) and len(routing.explanation) == 2
    assert routing.explanation[1].startswith('rule 2 "b": does not match: modality')


def test_no_match_skips_with_every_rules_reason(t2_header):
    rules = RuleSet.model_validate({"rules": [
        {"name": "t1", "match": {"sequence_class": "T1"}, "models": ["total"]},
        {"name": "thin", "match": {"slice_thickness": {"max": 1.5}}, "models": ["total"]},
    ]})
    routing = route(rules, _facts(t2_header))
    assert routing.skipped and routing.models == () and routing.matched == ()
    assert routing.skip_reason.startswith('no routing rule matches: rule 1 "t1": sequence_class T2 is not T1')
    assert routing.skip_reason.endswith('; rule 2 "thin": slice_thickness 2.5 mm is above the maximum 1.5 mm')


def test_no_rules_skips_every_series(t1_header):
    routing = route(RuleSet(), _facts(t1_header))
    assert routing.skip_reason == "no routing rule matches: no rules are configured"
    assert routing.explanation == ()


def test_a_skip_rule_skips_even_after_a_continue_rule(t1_header):
    rules = RuleSet.model_validate({"rules": [
        {"name": "everything", "models": ["total"], "continue": True},
        {"name": "no-localizers", "match": {"anatomical": False}, "skip": True, "reason": "localizers are not segmented"},
        {"name": "later", "models": ["brain"]},
    ]})
    localizer = route(rules, _facts(t1_header, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert localizer.skip_reason == 'skipped by rule 2 "no-localizers": localizers are not segmented'
    assert localizer.models == () and localizer.destinations == ()
    assert [m.name for m in localizer.matched] == ["everything", "no-localizers"]
    assert localizer.explanation[1].endswith("; skip (localizers are not segmented)")
    assert localizer.explanation[2] == 'rule 3 "later": not evaluated (rule 2 decided)'

    anatomical = route(rules, _facts(t1_header))
    assert anatomical.skip_reason is None and anatomical.models == ("total", "brain")


def test_a_skip_rule_without_a_reason(t1_header):
    rules = RuleSet.model_validate({"rules": [{"name": "off", "skip": True}]})
    assert route(rules, _facts(t1_header)).skip_reason == 'skipped by rule 1 "off"'


# --- validation of the config -----------------------------------------------------------


def test_unknown_model_or_destination_is_named():
    rules = RuleSet.model_validate({"rules": [
        {"name": "total", "models": ["total"], "continue": True},
        {"name": "brain", "models": ["kidney"], "destinations": ["pacs"], "continue": True},
        {"name": "kidneys", "models": ["kidney_v2"], "destinations": ["archive"]},
    ]})
    rules.check_references(["total", "kidney", "kidney_v2"], {"pacs", "archive"})
    with pytest.raises(ValueError) as refused:
        rules.check_references(["total", "kidney"], {"pacs", "archive"})
    assert str(refused.value) == 'rules[2] (name "kidneys"): unknown model "kidney_v2"; models are: total, kidney'
    with pytest.raises(ValueError) as refused:
        rules.check_references({"total", "kidney", "kidney_v2"}, {"pacs"})
    assert str(refused.value) == ('rules[2] (name "kidneys"): unknown destination "archive";'
                                  ' destinations are: pacs')


@pytest.mark.parametrize("field", ["manufacturer", "series_description", "study_description", "protocol_name"])
def test_a_bad_regex_is_refused_naming_the_field(field):
    with pytest.raises(ValueError) as refused:
        _one_rule({field: "t1_(fl2d"})
    assert isinstance(refused.value, ValidationError)
    text = str(refused.value)
    assert f"rules.0.match.{field}" in text
    assert f"{field}: 't1_(fl2d' is not a valid regular expression" in text


def test_rule_names_are_unique():
    with pytest.raises(ValueError, match=r'rules\[2\] \(name "t1"\): name already used by rules\[0\]'):
        RuleSet.model_validate({"rules": [{"name": "t1", "models": ["a"]}, {"name": "t2", "models": ["a"]},
                                          {"name": "t1", "models": ["b"]}]})


@pytest.mark.parametrize("rule, message", [
    ({"name": "x"}, "models must name one or more model presets"),
    ({"name": "x", "models": []}, "models must name one or more model presets"),
    ({"name": "x", "skip": True, "models": ["total"]}, "a skip rule runs no models"),
    ({"name": "x", "skip": True, "destinations": ["pacs"]}, "a skip rule runs no models"),
    ({"name": "x", "skip": True, "continue": True}, "a skip rule ends the evaluation"),
    ({"name": "x", "models": ["total"], "reason": "why"}, "reason is for skip rules only"),
    ({"name": "x", "models": ["total"], "destinations": []}, "destinations must name one or more"),
    ({"name": "x", "models": ["total", "total"]}, "models names total more than once"),
    ({"name": " ", "models": ["total"]}, "name must not be blank"),
    ({"models": ["total"]}, "name\n  Field required"),
    ({"name": "x", "models": ["total"], "match": {"modalty": "MR"}}, "match.modalty\n  Extra inputs are not permitted"),
    ({"name": "x", "models": ["total"], "stop": True}, "stop\n  Extra inputs are not permitted"),
    ({"name": "x", "models": ["total"], "match": {"modality": []}}, "modality needs one or more non-empty values"),
    ({"name": "x", "models": ["total"], "match": {"sequence_class": "T3"}}, "match.sequence_class"),
    ({"name": "x", "models": ["total"], "match": {"slice_thickness": {}}}, "a range needs min, max or both"),
    ({"name": "x", "models": ["total"], "match": {"slice_thickness": {"min": 3, "max": 1}}}, "min 3 is above max 1"),
    ({"name": "x", "models": ["total"], "match": {"slice_thickness": {"mn": 1}}}, "Extra inputs are not permitted"),
])
def test_invalid_rules_are_refused(rule, message):
    with pytest.raises(ValidationError) as refused:
        RuleSet.model_validate({"rules": [rule]})
    assert message in str(refused.value)


def test_config_objects_are_frozen_and_continue_takes_either_name(t1_header):
    rule = Rule(name="a", models=("total",), continue_=True)
    assert rule == Rule.model_validate({"name": "a", "models": ["total"], "continue": True})
    with pytest.raises(ValidationError):
        rule.name = "b"  # type: ignore[misc]
    assert Match().first_mismatch(_facts(t1_header)) is None
    assert Range(min=1).contains(1) and not Range(max=1).contains(1.5)


def test_the_docstring_example_is_a_valid_rule_set(t1_header):
    doc = pipeline.routing.rules.__doc__
    block = doc.split("::\n", 1)[1]
    example = yaml.safe_load(textwrap.dedent(block))
    rules = RuleSet.model_validate(example)
    assert [r.name for r in rules.rules] == ["no-localizers", "t1-brain", "research-scanner"]
    rules.check_references({"total", "brain"}, {"research_pacs"})
    routing = route(rules, _facts(t1_header, calling_ae_title="PRISMA_RES", SliceThickness="1"))
    assert routing.models == ("total", "brain") and routing.destinations is None


# --- facts read from headers --------------------------------------------------------------


def test_facts_are_read_tolerantly(t1_header):
    facts = _facts(t1_header, calling_ae_title="  MODALITY ", SeriesDescription="  t1 vibe  ",
                   Manufacturer=None, MagneticFieldStrength=None)
    assert facts.series_description == "t1 vibe" and facts.calling_ae_title == "MODALITY"
    assert facts.manufacturer == "" and facts.magnetic_field_strength is None

    garbled = copy.deepcopy(t1_header)  # as a careless writer might leave it, read as pydicom reads it
    for tag, text in ((Tag(0x00180050), b"four mm "), (Tag(0x00180087), b"3,0 ")):
        garbled[tag] = RawDataElement(tag, "DS", len(text), text, 0, False, True, True, False)
    facts = series_facts([garbled], classify_series([garbled], []), "MODALITY")
    assert facts.slice_thickness is None and facts.magnetic_field_strength is None
    routing = route(_one_rule({"slice_thickness": {"max": 5}}), facts)
    assert routing.skip_reason == ('no routing rule matches: rule 1 "only": slice_thickness is missing or unreadable,'
                                   ' the rule needs at most 5 mm')


def test_facts_take_the_classifiers_verdict(t1_header):
    facts = _facts(t1_header)
    assert facts.sequence_class is SequenceClass.T1 and facts.anatomical
    assert facts.classification_reason.startswith("spoiled/prepared gradient echo")
    assert SeriesFacts(**{**facts.__dict__, "sequence_class": "other"}).sequence_class is SequenceClass.OTHER
    with pytest.raises(ValueError):
        SeriesFacts(**{**facts.__dict__, "sequence_class": "T3"})
    with pytest.raises(ValueError, match="without image headers"):
        series_facts([], classify_series([], []), "MODALITY")


def _enhanced(shared: float | None, per_frame: float | None) -> Dataset:
    """A minimal Enhanced MR header: SliceThickness only in the functional groups."""
    ds = Dataset()
    ds.Modality = "MR"
    ds.MagneticFieldStrength = "1.5"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]

    def group(thickness):
        item = Dataset()
        if thickness is not None:
            measures = Dataset()
            measures.SliceThickness = thickness
            measures.PixelSpacing = [1, 1]
            item.PixelMeasuresSequence = DicomSequence([measures])
        return item

    ds.SharedFunctionalGroupsSequence = DicomSequence([group(shared)])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([group(per_frame), group(9.0)])
    return ds


@pytest.mark.parametrize("shared, per_frame, expected", [
    (1.2, None, 1.2),  # shared functional groups
    (None, 0.8, 0.8),  # the first frame's functional groups
    (1.2, 0.8, 1.2),  # shared wins
    (None, None, None),
])
def test_multi_frame_slice_thickness_from_the_functional_groups(shared, per_frame, expected):
    ds = _enhanced(shared, per_frame)
    facts = series_facts([ds], classify_series([ds], []), "MODALITY")
    assert facts.slice_thickness == expected and facts.magnetic_field_strength == 1.5
    routing = route(_one_rule({"slice_thickness": {"max": 1}}), facts)
    assert bool(routing.matched) is (expected is not None and expected <= 1)


def test_real_enhanced_series_slice_thickness(mri_dir):
    folder = mri_dir / "hard_enhanced_philips_b0map_t1label_phantom"
    headers = read_image_headers(sorted(folder.glob("*.dcm")))
    assert "SliceThickness" not in headers[0]
    facts = series_facts(headers, classify_series(headers, []), "MODALITY")
    assert facts.slice_thickness == 4.0 and facts.magnetic_field_strength == 3.0
    assert (facts.sequence_class, facts.anatomical) == (SequenceClass.OTHER, False)


def test_patient_data_copied_into_descriptions_is_masked(t1_header):
    facts = _facts(t1_header, PatientName="Doe^Jane", PatientID="ID12345",
                   StudyDescription="ID12345 brain", SeriesDescription="t1 DOE jane", ProtocolName="Jane")
    assert (facts.study_description, facts.series_description, facts.protocol_name) == (
        "*** brain", "t1 *** ***", "***")


@pytest.fixture(scope="module")
def patient_data(mri_dir) -> set[str]:
    return patient_strings(mri_dir)


def test_no_patient_data_in_facts_or_explanations(mri_dir, patient_data):
    """Some scanners copy the patient ID into StudyDescription (the Philips series here)."""
    for folder in sorted(p.name for p in mri_dir.iterdir() if p.is_dir()):
        _check_no_patient_data(mri_dir / folder, patient_data)


def _check_no_patient_data(folder, patient_data) -> None:
    headers = read_image_headers(sorted(folder.glob("*.dcm")))
    facts = series_facts(headers, classify_series(headers, []), "MODALITY")
    fields = ["modality", "body_part_examined", "manufacturer", "series_description", "study_description",
              "protocol_name"]
    # Every text field in a matching line and in a failing one.
    rules = RuleSet.model_validate({"rules": [
        {"name": "shown", "match": {f: "" for f in fields[2:]}, "models": ["a"], "continue": True},
        *({"name": f, "match": {f: "^(?!)"}, "models": ["a"], "continue": True} for f in fields[2:]),
    ]})
    routing = route(rules, facts)
    text = repr(facts) + "\n".join(routing.explanation) + (routing.skip_reason or "")
    leaks = sum(secret in text for secret in patient_data)
    if leaks:  # the failure message must not show them either
        pytest.fail(f"{folder.name}: {leaks} patient name(s)/ID(s) in the routing facts or explanation")
