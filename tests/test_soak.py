"""A short soak: a small hospital day against a real node (tests/support/soak.py, the
engine of bench/soak.py). Twenty series, a third T1, from three concurrent senders (dcmtk
per series and per instance, pynetdicom per series and per instance, pynetdicom split over
several associations); one destination outage, one kill -9 of the node and a restart; the
spool on a small tmpfs with disk pressure and retention periods of seconds. Invariants
only, no timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.soak import Fault, FaultKind, SoakSettings, format_report, run_soak

pytestmark = [pytest.mark.e2e, pytest.mark.peers]

SETTINGS = SoakSettings(
    series=20,
    faults=(Fault(FaultKind.OUTAGE, 0.3, 10.0), Fault(FaultKind.KILL, 0.6)),
    stable_seconds=5.0,
    incomplete_grace_seconds=15.0,
    spool_megabytes=128,  # the day sends about 150 MiB through it
    min_free_megabytes=16,
    pressure_free_megabytes=48,
    sent_minutes=1.0,
    skipped_minutes=0.5,
    failed_minutes=1.0,
    retention_interval_seconds=1.0,
    settle_seconds=240,
)


def test_a_short_day_with_an_outage_a_kill_and_a_small_disk_keeps_every_invariant(
    tmp_path: Path, mri_dir: Path, phantom_weights: Path
):
    report = run_soak(tmp_path, mri_dir, phantom_weights, SETTINGS)
    text = "\n".join(format_report(report))
    print(text)  # shown with -rA, and with a failure
    findings = report.findings

    assert not report.harness_errors, text
    assert [event.fault.kind for event in report.faults] == [FaultKind.OUTAGE, FaultKind.KILL], text
    assert report.settled, text
    assert not findings.undelivered, text
    # counted per C-STORE at the destination: a duplicate delivery is a second SEG
    assert findings.t1_seg_counts == {} and len(findings.t1_with_one_seg) == findings.t1_series == 7, text
    assert findings.partial_segs == [], text
    assert findings.stray_segs == [], text
    assert len(findings.others) == 13 and findings.others_not_ended == [], text
    assert report.spool_end_bytes <= report.spool_bound_bytes, text
    assert report.healthz[0] == 200, text
