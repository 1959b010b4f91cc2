"""Retention: every ended job's files go after the period of its outcome, the first ended
go first under disk pressure, nothing open is touched, and an instance that arrives while
retention deletes survives it. Most tests run on a real state store and real files in
``tmp_path``; the last ones run a node."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from dicom_node.config import RetentionSettings, parse_config
from dicom_node.errors import ConfigError
from dicom_node.metrics import Metrics
from dicom_node.service import Node
from dicom_node.store.retention import Reason, Retention
from dicom_node.store.spool import Spool
from dicom_node.store.state import JobState, JobUpdate, SeriesRef, StateStore
from tests.support.dcmtk import storescu
from tests.support.node import NodeProcess, node_fixture, node_settled
from tests.support.paths import free_port
from tests.support.wait import wait_until

DAY = 86400.0
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY = "1.2.826.0.1.3680043.8.498.1"
KB = b"\0" * 1024


class Site:
    """A state store and a spool, with series received and jobs ended as the node does it."""

    def __init__(self, root: Path) -> None:
        self.spool = Spool(root / "spool")
        self.state = StateStore(root / "state.sqlite3")
        self.metrics = Metrics(self.state)
        self.free = 10**12  # what the injected free-space function answers: no disk pressure

    def retention(self, settings: RetentionSettings | None = None) -> Retention:
        return Retention(self.state, self.spool, settings or RetentionSettings(), 0,
                         deletions=self.metrics.retention_deletions, free_bytes=lambda: self.free)

    def ref(self, series: str) -> SeriesRef:
        return SeriesRef(STUDY, series, "MODALITY", self.spool.series_folder(STUDY, series))

    def receive(self, series: str, sop: str, size: int = 1) -> Path:
        """An instance as the C-STORE handler stores it (file, then row), received a minute
        ago: the file is older than its row, as every file at rest is."""
        path = self.spool.store_instance(STUDY, series, sop, KB * size)
        os.utime(path, (time.time() - 120, time.time() - 120))
        self.state.record_instance(self.ref(series), sop, MR, path, now=time.time() - 60)
        return path

    def series(self, series: str, count: int = 3, size: int = 1) -> list[Path]:
        return [self.receive(series, f"{series}.{n}", size) for n in range(1, count + 1)]

    def job(self, series: str, end: JobState | None, at: float | None = None) -> int:
        """Complete the series; its job ends in ``end`` (None: left ``received``) at ``at``."""
        job_id = self.state.complete_series(series)
        assert job_id is not None
        if end is JobState.SENT:
            self.send(job_id, at)
        elif end is not None:
            self.state.update_job(job_id, JobState.PROCESSING, now=at)
            self.state.update_job(job_id, end, JobUpdate(reason="test"), now=at)
        return job_id

    def send(self, job_id: int, at: float | None = None) -> None:
        self.state.update_job(job_id, JobState.PROCESSING, now=at)
        result = self.spool.store_result(job_id, "seg", f"{STUDY}.{job_id}.9", KB)
        self.state.start_sending(job_id, [("pacs", "seg", result.parent)], update=JobUpdate(result_path=result), now=at)
        item = self.state.outbox(job_id)[0]
        assert self.state.record_send(item.id, ok=True, now=at) is JobState.SENT

    def rows(self, series: str) -> int:
        return self.state.instance_count(series)

    def purged(self, job_id: int) -> bool:
        return bool(self.state.db.read_one("SELECT purged FROM jobs WHERE id = ?", (job_id,))[0])

    def deletions(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("dicom_node_retention_deletions_total", {"reason": reason}) or 0


@pytest.fixture
def site(tmp_path: Path):
    site = Site(tmp_path)
    yield site
    site.state.close()


def _gone(paths: list[Path]) -> bool:
    return not any(path.exists() for path in paths)


def _kept(paths: list[Path]) -> bool:
    return all(path.exists() for path in paths)


def test_every_ended_outcome_goes_after_its_period_and_an_open_job_keeps_its_series(site):
    settings = RetentionSettings(days=0, skipped_days=1, failed_days=30)
    skipped = site.series("1.2.3.1")
    site.job("1.2.3.1", JobState.SKIPPED)
    failed = site.series("1.2.3.2")
    failed_job = site.job("1.2.3.2", JobState.FAILED)
    grown = site.series("1.2.3.3")  # a job superseded by the grown series' job, which found nothing
    first = site.job("1.2.3.3", None)
    grown.append(site.receive("1.2.3.3", "1.2.3.3.4"))
    second = site.job("1.2.3.3", JobState.NO_RESULT)
    assert site.state.job(first).state is JobState.SUPERSEDED
    sent = site.series("1.2.3.4")  # sent: retention.days 0 keeps it
    sent_job = site.job("1.2.3.4", JobState.SENT)
    reprocessed = site.series("1.2.3.5")  # sent, then processed again and skipped: goes as skipped
    sent_first = site.job("1.2.3.5", JobState.SENT)
    again = site.state.reprocess(sent_first).id
    site.state.update_job(again, JobState.PROCESSING)
    site.state.update_job(again, JobState.SKIPPED, JobUpdate(reason="test"))
    open_series = site.series("1.2.3.6")  # skipped long ago, but its grown series' job still runs
    skipped_before = site.job("1.2.3.6", JobState.SKIPPED)
    open_series.append(site.receive("1.2.3.6", "1.2.3.6.4"))
    still_open = site.job("1.2.3.6", None)
    site.state.claim_next_processing()  # one open job is processing, another received

    retention = site.retention(settings)
    assert retention.run(now=time.time() + 0.5 * DAY) == []  # nothing has passed its period

    deleted = retention.run(now=time.time() + 2 * DAY)
    assert sorted(d.candidate.series_instance_uid for d in deleted) == ["1.2.3.1", "1.2.3.3", "1.2.3.5"]
    assert {d.reason for d in deleted} == {Reason.PERIOD} and site.deletions("period") == 3
    assert _gone(skipped) and _gone(grown) and _gone(reprocessed)
    assert not site.spool.series_folder(STUDY, "1.2.3.1").exists()  # the empty folder went too
    assert not site.spool.result_folder(sent_first).exists()  # the reprocessed job's results went with it
    assert _kept(failed) and _kept(sent) and _kept(open_series)
    assert site.spool.result_folder(sent_job).exists()
    assert [site.rows(uid) for uid in ("1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4", "1.2.3.5", "1.2.3.6")] == \
        [0, 3, 0, 3, 0, 4]
    # the job rows stay, marked purged: the audit trail
    assert site.state.job(first).state is JobState.SUPERSEDED and site.purged(first) and site.purged(second)
    assert site.purged(sent_first) and site.purged(again) and not site.purged(failed_job)
    assert not site.purged(skipped_before) and not site.purged(still_open)

    deleted = retention.run(now=time.time() + 31 * DAY)
    assert [d.candidate.series_instance_uid for d in deleted] == ["1.2.3.2"]
    assert _gone(failed) and site.purged(failed_job) and site.rows("1.2.3.2") == 0
    deleted = retention.run(now=time.time() + 10_000 * DAY)
    assert deleted == [] and _kept(sent) and _kept(open_series) and site.deletions("period") == 4
    with pytest.raises(ValueError, match="deleted by retention"):
        site.state.requeue(failed_job)
    with pytest.raises(ValueError, match="deleted by retention"):
        site.state.reprocess(again)


def test_disk_pressure_deletes_the_first_ended_first_and_never_an_open_job(site):
    now = time.time()
    old = site.series("1.2.4.1", size=100)  # ended second
    site.job("1.2.4.1", JobState.SENT, at=now - 2 * DAY)
    oldest = site.series("1.2.4.2", size=100)  # ended first, although its job was created later
    site.job("1.2.4.2", JobState.SKIPPED, at=now - 3 * DAY)
    newest = site.series("1.2.4.3", size=100)
    site.job("1.2.4.3", JobState.FAILED, at=now - 1 * DAY)
    running = site.series("1.2.4.4", size=500)
    site.job("1.2.4.4", None)
    # a disk as the spool's files fill it: 1 GB free at first
    def used() -> int:
        return sum(f.stat().st_size for f in site.spool.root.rglob("*") if f.is_file())

    capacity = 10**9 + used()
    retention = Retention(site.state, site.spool, RetentionSettings(days=0, skipped_days=0, failed_days=0),
                          min_free_bytes=10**6, deletions=site.metrics.retention_deletions,
                          free_bytes=lambda: capacity - used())
    assert retention.pressure_free_bytes == 2 * 10**6  # twice storage.min_free_bytes
    assert retention.run() == []  # enough room: periods of 0 keep everything

    capacity -= 10**9 - 2 * 10**6 + 50 * 1024  # 50 KiB below the mark: one series of 300 KiB is enough
    assert [uid for uid in (c.series_instance_uid for c, _ in retention.plan())] == ["1.2.4.2"]
    deleted = retention.run()
    assert [(d.candidate.series_instance_uid, d.reason) for d in deleted] == [("1.2.4.2", Reason.PRESSURE)]
    assert deleted[0].files == 3 and deleted[0].bytes == 300 * 1024
    assert _gone(oldest) and _kept(old) and _kept(newest) and _kept(running)

    capacity -= 10**6  # far below: every ended series goes, oldest first, the running one stays
    deleted = retention.run()
    assert [d.candidate.series_instance_uid for d in deleted] == ["1.2.4.1", "1.2.4.3"]
    assert _gone(old) and _gone(newest) and _kept(running) and site.rows("1.2.4.4") == 3
    assert site.deletions("pressure") == 3 and site.deletions("period") == 0


def test_an_instance_recorded_after_the_decision_keeps_its_series(site):
    files = site.series("1.2.5.1")
    site.job("1.2.5.1", JobState.SKIPPED)
    retention = site.retention()
    [candidate] = [c for c in retention.candidates() if c.due(time.time() + 2 * DAY)]
    late = site.receive("1.2.5.1", "1.2.5.1.9")  # between the decision and the deletion: the series reopens
    assert retention.delete(candidate, Reason.PERIOD) is None
    assert _kept(files + [late]) and site.rows("1.2.5.1") == 4 and not site.purged(candidate.jobs[0].id)


def test_a_file_written_but_not_yet_recorded_survives_the_purge(site):
    files = site.series("1.2.6.1")
    site.job("1.2.6.1", JobState.SKIPPED)
    retention = site.retention()
    [candidate] = retention.candidates()
    # the C-STORE handler has written a new instance and a known one again; their rows follow
    new = site.spool.store_instance(STUDY, "1.2.6.1", "1.2.6.1.9", KB)
    again = site.spool.store_instance(STUDY, "1.2.6.1", "1.2.6.1.2", KB + b"again")
    deletion = retention.delete(candidate, Reason.PERIOD)
    assert deletion is not None and deletion.files == 2
    assert _gone([files[0], files[2]]) and new.exists() and again.read_bytes() == KB + b"again"
    assert site.rows("1.2.6.1") == 0 and site.purged(candidate.jobs[0].id)
    assert not list(again.parent.glob(".*"))  # nothing left aside
    for sop, path in (("1.2.6.1.9", new), ("1.2.6.1.2", again)):
        site.state.record_instance(site.ref("1.2.6.1"), sop, MR, path)
    assert sorted(site.state.instance_paths("1.2.6.1")) == sorted([new, again])  # the series has reopened
    assert [uid for uid, _ in site.state.receiving_series()] == ["1.2.6.1"]
    assert retention.candidates() == []  # receiving: not a candidate until its new job ends


def test_a_job_that_changed_after_the_decision_keeps_its_series(site):
    files = site.series("1.2.7.1")
    site.job("1.2.7.1", JobState.SKIPPED)
    retention = site.retention()
    candidates = retention.candidates()
    site.state.update_job(candidates[0].jobs[0].id, JobState.FAILED, JobUpdate(reason="test"))  # ended otherwise
    assert retention.delete(candidates[0], Reason.PERIOD) is None and _kept(files)
    site.state.reprocess(candidates[0].jobs[0].id)  # now open again: not a candidate at all
    assert retention.candidates() == [] and retention.run(now=time.time() + 100 * DAY) == []


def test_a_run_that_fails_midway_is_rolled_back_and_the_next_one_completes(site):
    """What the node's loop relies on: a run that raises leaves no row half done."""
    files = site.series("1.2.8.1")
    site.job("1.2.8.1", JobState.SKIPPED)
    retention = site.retention()
    original = site.state.purge_series

    def failing(seen, delete):
        def broken(instances):
            delete(instances)
            raise OSError("disk error")
        return original(seen, broken)

    site.state.purge_series = failing
    with pytest.raises(OSError):
        retention.run(now=time.time() + 2 * DAY)
    assert site.rows("1.2.8.1") == 3 and not site.purged(site.state.jobs()[0].id)  # rolled back
    site.state.purge_series = original
    assert len(retention.run(now=time.time() + 2 * DAY)) == 1 and _gone(files) and site.rows("1.2.8.1") == 0


def test_write_problem_names_a_full_database(site):
    assert site.state.write_problem() is None
    db = site.state.db.connection
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(Exception, match="database or disk is full"):
        for n in range(100_000):
            site.receive("1.2.9.1", f"1.2.9.1.{n + 1}")
    problem = site.state.write_problem()
    assert problem is not None and "database or disk is full" in problem and "pages" in problem
    db.execute("PRAGMA max_page_count = 1073741823")
    assert "pages" not in site.state.write_problem()  # room again; the refusal is still reported a while
    assert site.state.write_problem(now=time.time() + 61) is None


@pytest.mark.parametrize("key", ["days", "skipped_days", "failed_days", "pressure_free_bytes", "interval_seconds"])
def test_retention_keys_refuse_negative_values(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"retention\.{key}"):
        parse_config({"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                      "retention": {key: -1}}, tmp_path)


def test_retention_keys_and_their_defaults(tmp_path):
    base = {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    config = parse_config(base, tmp_path)
    assert (config.retention.days, config.retention.skipped_days, config.retention.failed_days) == (0, 1, 30)
    assert config.retention.interval_seconds == 300
    assert config.retention.pressure_bytes(config.storage.min_free_bytes) == 2 * config.storage.min_free_bytes
    with pytest.raises(ConfigError, match=r"retention\.interval: unknown key"):
        parse_config({**base, "retention": {"interval": 1}}, tmp_path)
    with pytest.raises(ConfigError, match="must be at least storage.min_free_bytes"):
        parse_config({**base, "storage": {"min_free_bytes": 1000}, "retention": {"pressure_free_bytes": 999}},
                     tmp_path)
    with pytest.raises(ConfigError, match=r"retention\.interval_seconds"):
        parse_config({**base, "retention": {"interval_seconds": 0}}, tmp_path)
    off = parse_config({**base, "retention": {"pressure_free_bytes": 0}}, tmp_path)
    assert off.retention.pressure_bytes(off.storage.min_free_bytes) == 0


# -- a running node ---------------------------------------------------------------------

node = node_fixture(retention={"skipped_days": 0.2 / DAY, "interval_seconds": 0.1})


def _files_and_rows(node: NodeProcess) -> tuple[set[Path], set[Path]]:
    """The instance files in the node's spool and the files its instance rows name."""
    incoming = Path(node.config["storage"]["spool_dir"]) / "incoming"
    files = {path for path in incoming.rglob("*.dcm")}
    state = StateStore(Path(node.config["storage"]["state_db"]))
    try:
        rows = {Path(row[0]) for row in state.db.read("SELECT path FROM instances")}
    finally:
        state.close()
    return files, rows


def _metric(node: NodeProcess, name: str, labels: str) -> float:
    text = requests.get(f"http://127.0.0.1:{node.config['http']['port']}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + labels + " "))


@pytest.mark.peers
def test_a_running_node_deletes_skipped_series_and_keeps_every_instance_that_arrives_meanwhile(node, mri_dir):
    """A localizer (skipped) is sent again as soon as its last job ended, while the node's
    retention deletes it a fifth of a second after that (checking ten times a second):
    whatever the interleaving, every instance row the node holds when it stops has its
    file, and every file its row."""
    node.config["http"]["port"] = free_port()
    node.config["completion"]["stable_seconds"] = 1
    localizer = mri_dir / "hard_localizer_ge_3plane_phantom"
    node.start()
    storescu(node.port, localizer)
    wait_until(lambda: _metric(node, "dicom_node_retention_deletions_total", '{reason="period"}') >= 1, 60, 0.1,
               "retention to delete the skipped localizer")
    assert [job.state for job in node.jobs()] == [JobState.SKIPPED]
    assert _files_and_rows(node) == (set(), set())
    assert "retention (period): deleted series" in node.log()
    for _ in range(6):  # each round reopens the series just as retention is about to delete it
        storescu(node.port, localizer)
        wait_until(lambda: node_settled(node, 1), 60, 0.05, "the round's series to end")
    deletions = _metric(node, "dicom_node_retention_deletions_total", '{reason="period"}')
    assert node.stop() == 0
    files, rows = _files_and_rows(node)
    assert files == rows  # no row without its file, no file without its row
    assert all(job.state is JobState.SKIPPED for job in node.jobs())
    assert deletions >= 2 and "retention run failed" not in node.log()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 40 MiB tmpfs, as a spool's disk that fills (root only)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(folder)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.peers
def test_a_running_node_under_disk_pressure_deletes_the_first_ended_series(small_disk, node, mri_dir):
    """A localizer, then a T2 series, both skipped and kept by their periods; restarted
    with a pressure mark between what the disk has free and that plus the localizer, the
    node deletes the localizer, which ended first, and keeps the T2 series."""
    node.config["storage"]["spool_dir"] = str(small_disk / "spool")
    node.config["storage"]["min_free_bytes"] = 1_000_000
    node.config["retention"] = {"skipped_days": 0, "pressure_free_bytes": 0, "interval_seconds": 0.5}
    node.start()
    storescu(node.port, mri_dir / "hard_localizer_ge_3plane_phantom")
    wait_until(lambda: node_settled(node, 1), 60, 0.2, "the localizer's job to end")
    storescu(node.port, mri_dir / "t2_siemens_3t_tse_ax_adi")
    wait_until(lambda: node_settled(node, 2), 60, 0.2, "the T2 series' job to end")
    assert node.stop() == 0
    localizer, t2 = (job.series.folder for job in node.jobs())
    t2_files = sorted(t2.iterdir())
    localizer_bytes = sum(path.stat().st_size for path in localizer.iterdir())
    free = shutil.disk_usage(small_disk).free
    node.config["retention"]["pressure_free_bytes"] = free + localizer_bytes // 2
    node.start()
    wait_until(lambda: not localizer.exists(), 60, 0.2, "disk pressure to delete the localizer")
    assert node.stop() == 0
    assert sorted(t2.iterdir()) == t2_files
    assert "retention (pressure): deleted series" in node.log()
    assert shutil.disk_usage(small_disk).free >= node.config["retention"]["pressure_free_bytes"]


@pytest.mark.peers
def test_readyz_says_why_when_the_database_is_full(tmp_path, storescp):
    config = parse_config({
        "node": {"port": free_port()},
        "security": {"allowed_callers": [{"ae_title": "MODALITY"}]},
        # a destination that answers the node's echo at start (one that does not is not ready)
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port},
        "storage": {"min_free_bytes": 1_000_000},
        "http": {"port": free_port()},
    }, tmp_path)
    running = Node(config, segmenter=object())  # no series is processed here
    running.start()
    try:
        url = f"http://127.0.0.1:{config.http.port}/readyz"
        wait_until(lambda: requests.get(url, timeout=10).json()["failing"] == {}, 30, 0.1, "ready")
        db = running.state.db.connection
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        ref = SeriesRef(STUDY, "1.2.10.1", "MODALITY", tmp_path)
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            for n in range(100_000):  # what the C-STORE handler records, until the database takes no more
                running.state.record_instance(ref, f"1.2.10.1.{n + 1}", MR, tmp_path / f"{n}.dcm")
        answer = requests.get(url, timeout=10)
        assert answer.status_code == 503
        assert "database or disk is full" in answer.json()["failing"]["database"]
        assert str(config.storage.state_db) in answer.json()["failing"]["database"]
    finally:
        running.state.db.connection.execute("PRAGMA max_page_count = 1073741823")
        running.stop()


def test_a_series_sent_again_after_its_deletion_is_a_new_job(site):
    """Receive sequence numbers never go back when retention deletes the newest rows, so
    the same instances sent again are new to the series' last job."""
    site.series("1.2.11.1")
    first = site.job("1.2.11.1", JobState.SKIPPED)
    assert len(site.retention().run(now=time.time() + 2 * DAY)) == 1
    site.series("1.2.11.1")
    again = site.state.complete_series("1.2.11.1")
    assert again is not None and again != first
    assert site.state.job(again).upto_seq > site.state.job(first).upto_seq
    assert len(site.state.instance_paths("1.2.11.1", site.state.job(again).upto_seq)) == 3


def test_cleanup_shows_then_does_what_the_node_would(tmp_path):
    """``dicom-node cleanup --dry-run`` lists the series whose periods passed, with the
    outcome of each job; ``cleanup`` deletes them; jobs still within their period stay."""
    site = Site(tmp_path)
    skipped = site.series("1.2.12.1")
    site.job("1.2.12.1", JobState.SKIPPED, at=time.time() - 2 * DAY)
    failed = site.series("1.2.12.2")
    site.job("1.2.12.2", JobState.FAILED, at=time.time() - 2 * DAY)  # failed_days 30: kept
    site.state.close()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        "storage": {"spool_dir": str(tmp_path / "spool"), "state_db": str(tmp_path / "state.sqlite3"),
                    "min_free_bytes": 0},
        "retention": {"pressure_free_bytes": 0},
    }))

    def cleanup(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dicom_node", "cleanup", *args, "--config", str(config)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return result.stdout

    shown = cleanup("--dry-run")
    assert "would delete series 1.2.12.1 (jobs 1 skipped;" in shown and "its periods have passed" in shown
    assert "1.2.12.2" not in shown and shown.endswith("1 series would be cleaned up\n")
    assert _kept(skipped) and _kept(failed)
    done = cleanup()
    assert "deleted series 1.2.12.1 (jobs 1 skipped;" in done and "3 instance file(s)" in done
    assert _gone(skipped) and _kept(failed)
    assert cleanup("--dry-run").endswith("0 series would be cleaned up\n")
