"""The pieces of ``dicom-node pull`` that need no peer: the filters and the pull's key,
the ``sources`` config, the time window, the multipart parser of WADO-RS and the
rules' decision from series-level attributes."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.pull.common import PullFilter, SeriesFound
from dicom_node.pull.decide import decide
from dicom_node.pull.puller import window_wait
from dicom_node.pull.retrieve import _parts

BASE = {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}


def _config(*sources: dict):
    return parse_config({**BASE, "sources": list(sources)}, Path("."))


def test_filters_are_checked_and_name_the_pull():
    with pytest.raises(ValueError, match="at least one filter"):
        PullFilter()
    with pytest.raises(ValueError, match="YYYYMMDD"):
        PullFilter(date="2024-01-01")
    with pytest.raises(ValueError, match="regular expression"):
        PullFilter(series_description="(")
    assert PullFilter(date="20240101-").date == "20240101-"
    one = PullFilter(date="20240101-20241231", modality="MR")
    assert one.key("pacs") == PullFilter(modality="MR", date="20240101-20241231").key("pacs")
    assert one.key("pacs") != one.key("other") != PullFilter(date="20240101-20241231").key("pacs")
    assert PullFilter(series_description="t1").description_matches("T1_MPRAGE")


def test_sources_config():
    config = _config({"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "retrieve": "move",
                      "window": "19:00-07:00", "max_concurrent": 2},
                     {"name": "web", "protocol": "dicomweb", "url": "https://pacs.example.org/dicom-web"})
    assert config.source("pacs").window_minutes() == (19 * 60, 7 * 60)
    assert config.source("web").connection.peer == "https://pacs.example.org/dicom-web"
    for bad, message in [
        ({"name": "x"}, "needs ae_title, host, port"),
        ({"name": "x", "protocol": "dicomweb", "url": "http://a", "ae_title": "B"}, "not a setting of protocol"),
        ({"name": "x", "ae_title": "A", "host": "h", "port": 1, "window": "7-19"}, "HH:MM-HH:MM"),
        ({"name": "x", "ae_title": "A", "host": "h", "port": 1, "retrieve": "push"}, "sources\\[0\\].retrieve"),
        ({"name": "x", "protocol": "dicomweb", "url": "http://user:pw@a"}, "inside the URL is refused"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(bad)
    with pytest.raises(ConfigError, match="used twice"):
        _config({"name": "a", "ae_title": "A", "host": "h", "port": 1}, {"name": "a", "ae_title": "A", "host": "h",
                                                                          "port": 1})


@pytest.mark.parametrize("now, expected", [
    ("20:00", None), ("06:59", None), ("19:00", None),
    ("07:00", (12 * 3600, "19:00")), ("12:30", (6.5 * 3600, "19:00")),
])
def test_window_across_midnight(now, expected):
    hour, minute = (int(part) for part in now.split(":"))
    assert window_wait((19 * 60, 7 * 60), datetime.datetime(2024, 5, 1, hour, minute)) == expected


def test_window_within_a_day_and_none():
    assert window_wait(None, datetime.datetime(2024, 5, 1, 12, 0)) is None
    assert window_wait((8 * 60, 17 * 60), datetime.datetime(2024, 5, 1, 12, 0)) is None
    assert window_wait((8 * 60, 17 * 60), datetime.datetime(2024, 5, 1, 18, 0)) == (14 * 3600, "08:00")


@pytest.mark.parametrize("size", [1, 3, 7, 64, 4096])
def test_multipart_parts_in_any_chunking(size):
    body = (b"preamble\r\n--XYZ\r\nContent-Type: application/dicom\r\n\r\nAAAA\r\n--XY\r\n"
            b"--XYZ\r\nContent-Type: application/dicom\r\n\r\nBBBB\r\n--XYZ--\r\n")
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    assert list(_parts(iter(chunks), b"XYZ")) == [
        b"Content-Type: application/dicom\r\n\r\nAAAA\r\n--XY", b"Content-Type: application/dicom\r\n\r\nBBBB"]


def _found(**attributes) -> SeriesFound:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return SeriesFound("1.2.3", "1.2.3.4", ds)


def test_decision_from_series_level_attributes():
    config = parse_config(BASE, Path("."))
    t1 = decide(config, _found(Modality="MR", ImageType=["ORIGINAL", "PRIMARY"], RepetitionTime="300",
                               EchoTime="2.46", ScanningSequence="GR", SeriesDescription="t1_fl2d_sag"), "PACS")
    assert t1.retrieve and t1.reason.startswith("process (T1")
    t2 = decide(config, _found(Modality="MR", ImageType=["ORIGINAL", "PRIMARY"], RepetitionTime="11730",
                               EchoTime="91", ScanningSequence="SE"), "PACS")
    assert not t2.retrieve and "T2 series, not segmented by policy" in t2.reason
    localizer = decide(config, _found(Modality="MR", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                                      RepetitionTime="8", EchoTime="4"), "PACS")
    assert not localizer.retrieve and "localizer" in localizer.reason
    assert not decide(config, _found(Modality="SEG"), "PACS").retrieve
    unknown = decide(config, _found(Modality="MR", SeriesDescription="T2 TSE"), "PACS")
    assert unknown.retrieve and "did not return ImageType, RepetitionTime, EchoTime" in unknown.reason


def test_dry_run_record_masks_the_patient_in_the_description():
    from dicom_node.pull.decide import Decision
    from dicom_node.pull.puller import PlannedSeries

    found = _found(Modality="MR", SeriesDescription="t1 for Doe", PatientName="Doe^Jane", PatientID="P123")
    record = PlannedSeries(found, Decision(True, "process (T1; model default)"), False).record()
    assert record["series_description"] == "t1 for ***"
    assert "Doe" not in str(record) and "P123" not in str(record)
