"""``status``, ``retry`` and ``cleanup``: the operator's view of jobs and their sends."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

from dicom_node.cli.common import CONFIG_HELP, ExitStatus, load, unknown_destination
from dicom_node.config import Config
from dicom_node.store.state import Job, JobState, OutboxCounts, OutboxItem, OutboxState, StateStore

__all__ = ["register"]


def _job_json(job: Job, now: float, outbox=()) -> str:
    from dicom_node.web.status_page import job_record

    return json.dumps(job_record(job, now, outbox))


def _timeline(job: Job) -> str:
    """When the job passed each stage, and how long each took (UTC)."""
    def at(timestamp: float | None) -> str:
        return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"

    def took(seconds: float | None) -> str:
        return "" if seconds is None else f" ({seconds:.1f}s)"

    stages = job.stage_seconds()
    parts = [f"received {at(job.received_at)}", f"completed {at(job.completed_at)}{took(stages['receiving'])}"]
    if job.completed_at is None or abs(job.queued_since - job.completed_at) >= 1.0:
        # processed again (retry --reprocess) or queued again (retry): "queued" counts from then
        parts.append(f"queued again {at(job.queued_since)}")
    if job.processing_at is not None:
        parts.append(f"processing {at(job.processing_at)} (queued {stages['queued']:.1f}s)"
                     if stages["queued"] is not None else f"processing {at(job.processing_at)}")
    if job.processed_at is not None:
        parts.append(f"processed {at(job.processed_at)}{took(stages['processing'])}")
    if job.sent_at is not None:
        parts.append(f"sent {at(job.sent_at)}{took(stages['sending'])}")
    return "UTC " + ", ".join(parts)


def _status_lines(jobs: list[Job], as_json: bool, now: float,
                  outboxes: dict[int, list[OutboxItem]] | None = None) -> list[str]:
    outboxes = outboxes or {}
    if as_json:
        return [_job_json(job, now, outboxes.get(job.id, ())) for job in jobs]
    if not jobs:
        return ["no jobs"]
    lines = []
    for job_state in JobState:
        selected = [job for job in jobs if job.state is job_state]
        if not selected:
            continue
        lines.append(f"{job_state.value}: {len(selected)}")
        for job in selected:
            made = f" [{job.sequence_class or '?'}, {job.preprocessing or 'not segmented'}]" if job.sequence_class else ""
            last = f" (last error: {job.last_error})" if job.last_error and job.state is not JobState.FAILED else ""
            again = f" (again from job {job.reprocess_of})" if job.reprocess_of else ""
            lines.append(f"  job {job.id}{again} series {job.series.series_instance_uid} from"
                         f" {job.series.calling_ae_title}{_sends_count(job, outboxes.get(job.id, ()))}{made}:"
                         f" {job.reason or ''}{last}")
            lines.append(f"      {_timeline(job)}")
            if job.model_run:
                lines.append(f"      model: {job.model_run}")
            if job.state in (JobState.SENDING, JobState.FAILED, JobState.REVIEW, JobState.REJECTED,
                             JobState.EXPIRED) and outboxes.get(job.id):
                lines.append("      sends: " + ", ".join(_send_text(item, now) for item in outboxes[job.id]))
    return lines


def _sends_count(job: Job, items) -> str:
    """What ``attempts`` counts, in words: objects delivered (one per object and
    destination) and send attempts (each try of each, failed or not)."""
    if not items:
        return f", {job.attempts} send attempt(s)" if job.attempts else ""
    sent = sum(item.state is OutboxState.SENT for item in items)
    tries = sum(item.attempts for item in items)
    return f", {sent} of {len(items)} object(s) delivered in {tries} send attempt(s)"


def _send_text(item: OutboxItem, now: float) -> str:
    text = f"{item.object} to {item.destination} {item.state.value}"
    if item.state is OutboxState.PENDING and item.attempts:
        text += f" (attempt {item.attempts} failed, next in {max(item.next_attempt_at - now, 0):.0f}s)"
    return text


def _destination_lines(config: Config, counts: dict[str, OutboxCounts]) -> list[str]:
    """The outbox of each configured destination (and of any the config no longer names)."""
    lines = []
    for destination in config.destinations:
        row = counts.get(destination.name, OutboxCounts())
        lines.append(f"destination {destination.name} ({destination.peer}; {', '.join(destination.outputs)}):"
                     f" {row.pending} pending, {row.sent} sent, {row.failed} failed"
                     + (f", {row.held} held for review" if row.held or destination.review == "required" else ""))
    for name in sorted(set(counts) - {d.name for d in config.destinations}):
        row = counts[name]
        lines.append(f"destination {name} (no longer configured): {row.pending} pending, {row.sent} sent,"
                     f" {row.failed} failed")
    return lines


def _workers_line(config: Config, jobs: list[Job]) -> str:
    """Where the model runs, the series in flight and the queue in front of it."""
    in_flight = sum(job.state is JobState.PROCESSING for job in jobs)
    waiting = sum(job.state is JobState.RECEIVED for job in jobs)
    if config.workers.backend == "celery":
        from dicom_node.remote.client import queue_depth

        depth = queue_depth(config.workers)
        queued = "Redis unreachable" if depth is None else f"{depth} task(s) in the Redis queue"
        return (f"workers: celery (queue {config.workers.queue}), {in_flight} series in flight of at most"
                f" {config.workers.max_in_flight}, {queued}, {waiting} job(s) waiting in the node")
    return f"workers: embedded warm runner, {in_flight} series in flight, {waiting} job(s) waiting"


def _refusal_lines(refused: dict, grace: float) -> list[str]:
    """Series still receiving of which the node refused instances: not whole until the
    sender stores them, and failed after the grace if it does not."""
    return [
        f"not whole, waiting up to {grace:g} s for the sender: series {uid}: the node refused {len(items)}"
        f" instance(s) (0x{items[-1].status:04X}: {items[-1].reason})"
        for uid, items in refused.items()
    ]


def _cmd_status(args: argparse.Namespace) -> int:
    config = load(args)
    state = StateStore(config.storage.state_db)
    try:
        jobs = every_job = state.jobs()
        outboxes = state.outboxes()
        counts = state.outbox_counts()
        refused = {uid: found for uid, _ in state.receiving_series() for found in [state.refusals(uid)] if found}
    finally:
        state.close()
    now = time.time()
    if args.state:
        jobs = [job for job in jobs if job.state.value in args.state]
    if args.since is not None:
        jobs = [job for job in jobs if job.updated_at >= now - args.since]
    lines = _status_lines(jobs, args.json, now, outboxes)
    if not args.json:
        lines[:0] = [_workers_line(config, every_job), *_destination_lines(config, counts),
                     *_refusal_lines(refused, config.completion.incomplete_grace_seconds)]
    for line in lines:  # a reader that stops early (`| head`) is no error: main ends quietly
        print(line)
    return ExitStatus.OK


def _cmd_retry(args: argparse.Namespace) -> int:
    config = load(args)
    state = StateStore(config.storage.state_db)
    try:
        if args.destination is not None and args.destination not in {d.name for d in config.destinations}:
            unknown_destination(config, args.destination)
        if args.reprocess:
            if args.destination is not None:
                raise ValueError("--reprocess makes every result again for every destination; leave out --destination")
            job = state.reprocess(args.job_id, allow_partial=args.allow_partial)
        else:
            if args.allow_partial:
                raise ValueError("--allow-partial goes with --reprocess: it processes a series that is not whole"
                                 " as a new job")
            old = state.job(args.job_id)
            if old is not None and old.state in (JobState.SENT, JobState.SKIPPED, JobState.NO_RESULT,
                                                 JobState.REJECTED, JobState.EXPIRED):
                raise ValueError(f"job {args.job_id} is {old.state.value}; `dicom-node retry --reprocess"
                                 f" {args.job_id}` processes its series again")
            job = state.requeue(args.job_id, destination=args.destination)
    except (KeyError, ValueError) as exc:
        print(str(exc.args[0] if exc.args else exc), file=sys.stderr)
        return ExitStatus.CONFIG_ERROR
    finally:
        state.close()
    if job.id != args.job_id:
        print(f"job {args.job_id} queued again as job {job.id} ({job.state.value}); a running node picks it up")
    else:
        print(f"job {job.id} queued again as {job.state.value}; a running node picks it up")
    return ExitStatus.OK


def _cmd_cleanup(args: argparse.Namespace) -> int:
    """The node's retention, once: periods per outcome, then disk pressure."""
    from dicom_node.store.retention import Reason, Retention
    from dicom_node.store.spool import Spool

    config = load(args)
    settings = config.retention
    if args.days is not None:
        if args.days < 0:
            print("--days: 0 (keep) or more", file=sys.stderr)
            return ExitStatus.CONFIG_ERROR
        settings = settings.model_copy(update={"days": args.days})
    state = StateStore(config.storage.state_db)
    try:
        retention = Retention(state, Spool(config.storage.spool_dir), settings, config.storage.min_free_bytes)
        if args.dry_run:
            chosen = [(candidate, reason, ", ".join(str(path) for path in retention.paths(candidate))
                       or "(no files left)") for candidate, reason in retention.plan()]
        else:
            chosen = [(deletion.candidate, deletion.reason,
                       f"{deletion.files} instance file(s) and the jobs' results, {deletion.bytes} bytes")
                      for deletion in retention.run()]
    finally:
        state.close()
    for candidate, reason, what in chosen:
        jobs = ", ".join(f"{job.id} {job.state.value}" for job in candidate.jobs)
        ended = datetime.fromtimestamp(candidate.ended_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        why = "its periods have passed" if reason is Reason.PERIOD else "disk pressure: the first ended go first"
        print(f"{'would delete' if args.dry_run else 'deleted'} series {candidate.series_instance_uid}"
              f" (jobs {jobs}; ended {ended} UTC; {why}): {what}")
    print(f"{len(chosen)} series {'would be' if args.dry_run else 'were'} cleaned up")
    return ExitStatus.OK


def register(commands) -> None:
    """``status``, ``retry`` and ``cleanup``."""
    status = commands.add_parser("status", help="list jobs by state, with their reasons")
    status.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    status.add_argument("--json", action="store_true", help="one JSON object per job and line")
    status.add_argument("--state", action="append", choices=[s.value for s in JobState], metavar="STATE",
                        help="only jobs in this state (repeatable): " + ", ".join(s.value for s in JobState))
    status.add_argument("--since", type=float, default=None, metavar="SECONDS",
                        help="only jobs that changed in the last SECONDS seconds")
    status.set_defaults(func=_cmd_status)

    retry = commands.add_parser("retry", help="queue a failed job again (--reprocess: any ended job)")
    retry.add_argument("job_id", type=int, help="the job's id, as `status` shows it")
    retry.add_argument("--reprocess", action="store_true",
                       help="process the job's series again as a new job, whatever its outcome (sent, skipped,"
                            " no_result, failed, rejected, expired), for example after a policy change")
    retry.add_argument("--allow-partial", action="store_true",
                       help="with --reprocess: process the series even though it is known not to be whole"
                            " (instances refused, slices missing); its results say PARTIAL and get their own UIDs")
    retry.add_argument("--destination", default=None, metavar="NAME",
                       help="only the sends to this destination (as the config names it)")
    retry.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    retry.set_defaults(func=_cmd_retry)

    cleanup = commands.add_parser(
        "cleanup", help="delete the files of ended jobs past their retention period (retention.days for sent,"
        " skipped_days for skipped and no_result, failed_days for failed, rejected and expired) and, under disk"
        " pressure, of the first"
        " ended; the node does this every retention.interval_seconds")
    cleanup.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    cleanup.add_argument("--days", type=float, default=None, help="override retention.days (sent jobs)")
    cleanup.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    cleanup.set_defaults(func=_cmd_cleanup)
