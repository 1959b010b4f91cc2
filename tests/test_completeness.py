"""When is a received series known to be whole? The rule on real headers."""

from __future__ import annotations

import pydicom
import pytest

from pipeline.input.wholeness import Placement, is_whole, placement_of


def _placements(folder) -> list[Placement]:
    return [placement_of(pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(folder.glob("*.dcm"))]


def _sorted_along_normal(placements: list[Placement]) -> list[Placement]:
    import numpy as np

    o = np.asarray(placements[0].orientation)
    normal = np.cross(o[:3], o[3:])
    return sorted(placements, key=lambda p: float(np.dot(p.position, normal)))


def test_a_series_with_its_announced_slice_count_is_whole_and_any_part_is_not(mri_dir):
    placements = _sorted_along_normal(_placements(mri_dir / "t1_philips_3t_mprage_sag"))  # Philips announces 170
    assert is_whole(placements).whole
    # a sender that stops early leaves a regular stack: only the announced count tells
    assert not is_whole(placements[:-3]).whole
    assert "announces 170" in is_whole(placements[:-3]).reason
    assert not is_whole(placements[3:]).whole
    assert not is_whole(placements[::2]).whole  # every other slice: regular, but half of it
    assert not is_whole(placements[:80] + placements[81:]).whole  # a gap


def test_without_an_announced_count_the_timer_decides(mri_dir, t1_dir):
    assert is_whole(_placements(t1_dir)).reason == "the headers announce no slice count"


def test_images_in_acquisition_makes_a_series_whole(t1_dir):
    placements = [Placement(**{**p.__dict__, "images_in_acquisition": 35}) for p in _placements(t1_dir)]
    assert is_whole(placements).whole
    assert not is_whole(placements[1:]).whole


@pytest.mark.parametrize("folder, whole", [
    ("hard_localizer_ge_3plane_phantom", False),  # three orientations
    ("hard_missing_slice_t1_fl2d_sag_hfs_derived", False),  # a gap
    ("hard_enhanced_philips_pcasl_source_plus_raw", True),  # a multi-frame object and raw data
    ("hard_enhanced_philips_b0map_t1label_phantom", True),
])
def test_shared_series(mri_dir, folder, whole):
    assert is_whole(_placements(mri_dir / folder)).whole is whole


def test_placements_survive_the_state_store_and_odd_headers():
    placement = Placement("classic", (1, 0, 0, 0, 1, 0), (0.0, 0.0, 1.5), 3, None, 1)
    assert Placement.from_json(placement.to_json()) == placement
    assert placement_of(pydicom.Dataset()).kind == "other"
    odd = pydicom.Dataset()
    odd.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    odd.ImagePositionPatient = [1.0, 2.0]  # two values, not three
    assert placement_of(odd).position is None
    assert not is_whole([placement_of(odd)]).whole
    assert not is_whole([Placement("unknown"), placement]).whole
