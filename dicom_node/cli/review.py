"""``review``: the jobs whose objects wait for a reviewer (``review: required``), and the
operator's decision on one: ``review list``, ``review approve JOB``, ``review reject JOB
--reason TEXT``. The same decisions as the status page's buttons (``dicom_node.work.review``),
on the node's state store: a running node sends approved objects at its next poll. Each
decision is an audit event (``audit.path``) naming the operator's login.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time

from dicom_node.cli.common import CONFIG_HELP, ExitStatus, load
from dicom_node.store.state import OutboxState, StateStore

__all__ = ["register"]


def _cmd_list(args: argparse.Namespace) -> int:
    config = load(args)
    state = StateStore(config.storage.state_db)
    try:
        jobs = state.awaiting_review()
        outboxes = state.outboxes([job.id for job in jobs]) if jobs else {}
        reviews = {job.id: state.review(job.id) for job in jobs}
    finally:
        state.close()
    now = time.time()
    expire = config.review.expire_days
    for job in jobs:
        held = [f"{item.object} to {item.destination}" for item in outboxes.get(job.id, ())
                if item.state is OutboxState.HELD]
        review = reviews[job.id]
        waited = (now - review.held_at) / 86400 if review is not None else None
        if args.json:
            print(json.dumps({"id": job.id, "state": job.state.value,
                              "study_instance_uid": job.series.study_instance_uid,
                              "series_instance_uid": job.series.series_instance_uid,
                              "calling_ae_title": job.series.calling_ae_title, "held": held,
                              "waiting_days": None if waited is None else round(waited, 3),
                              "reason": job.reason}))
            continue
        expires = f", expires in {max(expire - waited, 0):.1f} day(s)" if expire and waited is not None else ""
        print(f"job {job.id} ({job.state.value}) series {job.series.series_instance_uid} from"
              f" {job.series.calling_ae_title}: {', '.join(held)}"
              + (f"; waiting {waited:.1f} day(s){expires}" if waited is not None else "") + f": {job.reason or ''}")
    if not jobs and not args.json:
        print("no job waits for review")
    return ExitStatus.OK


def _decide(args: argparse.Namespace) -> int:
    from dicom_node.audit import Audit
    from dicom_node.metrics import Metrics
    from dicom_node.store.spool import Spool
    from dicom_node.work.processor import Processor
    from dicom_node.work.review import ReviewRefused, Reviews

    config = load(args)
    audit = Audit(config.audit, ae_title=config.node.ae_title) if config.audit.enabled else Audit.off()
    state = StateStore(config.storage.state_db)
    audit.start()
    try:
        # outcomes (rejected, or failed) are audited as the node audits every job's end
        processor = Processor(config, state, Spool(config.storage.spool_dir), {}, Metrics(), audit)
        reviews = Reviews(state, audit=audit, ended=processor.audit_end)
        who = {"user": getpass.getuser(), "role": "command line"}
        if args.decision == "approve":
            job_state = reviews.approve(args.job_id, who)
        else:
            job_state = reviews.reject(args.job_id, args.reason, who)
    except ReviewRefused as exc:
        print(f"dicom-node review {args.decision}: {exc}", file=sys.stderr)
        return ExitStatus.FAILURE
    finally:
        audit.close()
        state.close()
    if args.decision == "approve":
        print(f"job {args.job_id} approved: {job_state.value}; a running node sends its held objects")
    else:
        print(f"job {args.job_id} rejected: {job_state.value}; its held objects are never sent")
    return ExitStatus.OK


def register(commands) -> None:
    """``review list``, ``review approve`` and ``review reject``."""
    review = commands.add_parser("review", help="jobs whose objects wait for a reviewer (destinations with"
                                                " review: required): list, approve, reject")
    actions = review.add_subparsers(dest="review_command", required=True, metavar="{list,approve,reject}",
                                    help="list the waiting jobs, or approve or reject one")
    listing = actions.add_parser("list", help="the jobs waiting for review, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per job and line")
    listing.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    listing.set_defaults(func=_cmd_list)
    approve = actions.add_parser("approve", help="send the job's held objects")
    approve.add_argument("job_id", type=int, help="the job's id, as `review list` shows it")
    approve.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    approve.set_defaults(func=_decide, decision="approve")
    reject = actions.add_parser("reject", help="never send the job's held objects, recording why")
    reject.add_argument("job_id", type=int, help="the job's id, as `review list` shows it")
    reject.add_argument("--reason", required=True, help="why (kept in the job and the audit trail)")
    reject.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    reject.set_defaults(func=_decide, decision="reject")
