"""The status page's review view: a job's held objects, looked at and approved or rejected.

Routes (served by ``StatusPage``, which asks this first):

* ``GET /review/ID`` the view (``static/review.html`` and ``review.js``): a shell without
  data, which asks for the token as the status page does;
* ``GET /api/jobs/ID/review`` the job, its held objects, its review record and the
  planes of its series (how many, which carry a segment, the segments' names and colours);
* ``GET /api/jobs/ID/review/K.png`` plane K (0-based, slice order) of the source series
  with the segments of the job's SEG drawn over it (``pipeline.review``, the overlay
  series' drawing), from MR images without burned-in annotation only, and not at all
  with ``http.ui_previews: false``;
* ``POST /api/jobs/ID/approve`` sends the held objects (``dicom_node.work.review``);
* ``POST /api/jobs/ID/reject`` never sends them; the reason, required, travels
  percent-encoded in the ``X-Review-Reason`` header (never in the URL, which logs keep).

Reads need the read or action token, the two actions the action token; without a token
the answer is 401, with a wrong one 403 (``dicom_node.web.access``). Every action, the
refused ones too, is an audit event (``Audit.record_review``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from dicom_node.audit import Audit
from dicom_node.store.state import Job, JobState, OutboxState, StateStore
from dicom_node.web.access import Gate, Need
from dicom_node.web.http import Response
from dicom_node.work.review import ReviewRefused, Reviews

__all__ = ["ReviewPage", "REASON_HEADER"]

log = logging.getLogger(__name__)

REASON_HEADER = "X-Review-Reason"
_VIEW = re.compile(r"^/review/(\d+)/?$")
_API = re.compile(r"^/api/jobs/(\d+)/(review|approve|reject)$")
_PLANE = re.compile(r"^/api/jobs/(\d+)/review/(\d+)\.png$")
_STATIC = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
_STACKS_KEPT = 2  # decoded series kept for scrolling (a few hundred MB at most for large series)
_SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def _json(status: int, body: dict) -> Response:
    return Response(status, (json.dumps(body) + "\n").encode(), "application/json")


class ReviewPage:
    """The review view's routes (see the module docstring)."""

    def __init__(self, state: StateStore, gate: Gate, static_dir: Path, *, reviews: Reviews | None = None,
                 previews: bool = True, audit: Audit | None = None,
                 describe: Callable[[Job], str | None] = lambda job: None) -> None:
        """``reviews``: None, the view only (the actions answer 503); ``describe``: the
        series description the status page shows (masked)."""
        self.state = state
        self.gate = gate
        self.static_dir = static_dir
        self.reviews = reviews
        self.previews = previews
        self.audit = audit or Audit.off()
        self.describe = describe
        self._lock = threading.Lock()  # one series decoded at a time
        self._stacks: OrderedDict[tuple, object] = OrderedDict()

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers, client: str = "") -> Response | None:
        if method == "GET" and _VIEW.match(path):
            return self._static("review.html", "text/html; charset=utf-8")
        if method == "GET" and path.startswith("/static/") and path[len("/static/"):] in _STATIC:
            name = path[len("/static/"):]
            return self._static(name, _STATIC[name])
        plane = _PLANE.match(path)
        if plane is not None:
            if method != "GET":
                return _json(405, {"error": "use GET"})
            return self._refused(headers, client, Need.READ, method, path) or self._plane(
                int(plane.group(1)), int(plane.group(2)))
        match = _API.match(path)
        if match is None:
            return None
        job_id, action = int(match.group(1)), match.group(2)
        if action == "review":
            if method != "GET":
                return _json(405, {"error": "use GET"})
            return self._refused(headers, client, Need.READ, method, path) or self._view(
                job_id, self.gate.can_act(headers))
        if method != "POST":
            return Response(405, b'{"error": "use POST"}\n', "application/json", {"Allow": "POST"})
        refused = self._refused(headers, client, Need.ACT, method, path)
        if refused is None:
            refused = self._act(job_id, action, headers, client)
            if refused[0] < 300:
                return refused
        else:
            log.warning("status page: %s of job %d from %s refused (HTTP %d)", action, job_id, client, refused[0])
        self._audit_refusal(job_id, action, client, refused)
        return refused

    # -- reads ----------------------------------------------------------------------------
    def _refused(self, headers, client: str, need: Need, method: str, path: str) -> Response | None:
        refusal = self.gate.check(headers, client, need, f"{method} {path}")
        if refusal is None:
            return None
        return Response(refusal.status, (json.dumps({"error": refusal.error}) + "\n").encode(), "application/json",
                        dict(refusal.headers))

    def _static(self, name: str, kind: str) -> Response:
        return Response(200, (self.static_dir / name).read_bytes(), kind)

    def _view(self, job_id: int, acts: bool) -> Response:
        job = self.state.job(job_id)
        if job is None:
            return _json(404, {"error": f"no job {job_id}"})
        outbox = self.state.outbox(job_id)
        review = self.state.review(job_id)
        body: dict = {
            "job": {"id": job.id, "state": job.state.value, "reason": job.reason,
                    "study_instance_uid": job.series.study_instance_uid,
                    "series_instance_uid": job.series.series_instance_uid,
                    "calling_ae_title": job.series.calling_ae_title, "sequence_class": job.sequence_class,
                    "series_description": self.describe(job)},
            "sends": [{"destination": item.destination, "object": item.object, "state": item.state.value}
                      for item in outbox],
            "waiting": any(item.state is OutboxState.HELD for item in outbox)
            and job.state in (JobState.REVIEW, JobState.SENDING),
            "review": None if review is None else {
                "held_at": review.held_at, "decision": review.decision.value if review.decision else None,
                "decided_at": review.decided_at, "reviewer": review.reviewer, "reason": review.reason},
            "can_act": acts and self.reviews is not None,
            "images": self.previews,
            "planes": 0, "labelled": [], "segments": [], "seg": False, "image_error": None,
        }
        if self.previews:
            try:
                stack = self._stack(job)
            except _Unavailable as exc:
                body["image_error"] = str(exc)
            else:
                body.update(planes=stack.count, labelled=stack.labelled_planes(), seg=stack.has_seg,
                            segments=[{"number": number, "name": name, "rgb": [int(v) for v in stack.colours[number]]}
                                      for number, name in sorted(stack.names.items())])
        return _json(200, body)

    def _plane(self, job_id: int, index: int) -> Response:
        if not self.previews:
            return _json(404, {"error": "previews are off (http.ui_previews: false)"})
        job = self.state.job(job_id)
        if job is None:
            return _json(404, {"error": f"no job {job_id}"})
        try:
            stack = self._stack(job)
        except _Unavailable as exc:
            return _json(exc.status, {"error": str(exc)})
        if not 0 <= index < stack.count:
            return _json(404, {"error": f"job {job_id}: no plane {index} (0..{stack.count - 1})"})
        return Response(200, stack.png(index), "image/png")

    def _stack(self, job: Job):
        """The job's series with its SEG, decoded once and kept for scrolling."""
        from pipeline.errors import PipelineError
        from pipeline.review import load_review_stack

        seg = _seg_file(job)
        key = (job.id, job.upto_seq, str(seg))
        with self._lock:
            stack = self._stacks.get(key)
            if stack is not None:
                self._stacks.move_to_end(key)
                return stack
            paths = [path for path in self.state.instance_paths(job.series.series_instance_uid,
                                                                upto_seq=job.upto_seq) if path.is_file()]
            if not paths:
                raise _Unavailable(404, f"job {job.id}: its instances are no longer in the spool")
            try:
                stack = load_review_stack(paths, seg)
            except PipelineError as exc:
                raise _Unavailable(422, f"job {job.id}: no images: {exc}") from exc
            except (ValueError, AttributeError, RuntimeError, KeyError) as exc:  # a SEG highdicom cannot read back
                log.info("job %d: no review images: %s", job.id, exc)
                raise _Unavailable(422, f"job {job.id}: no images: {exc}") from exc
            self._stacks[key] = stack
            while len(self._stacks) > _STACKS_KEPT:
                self._stacks.popitem(last=False)
            return stack

    # -- actions --------------------------------------------------------------------------
    def _act(self, job_id: int, action: str, headers, client: str) -> Response:
        if self.reviews is None:
            return _json(503, {"error": "this node takes no review decisions from the page"})
        who = {"address": client, "role": "status page"}
        try:
            if action == "approve":
                state = self.reviews.approve(job_id, who)
                return _json(202, {"job": job_id, "state": state.value, "review": "approved"})
            reason = unquote(headers.get(REASON_HEADER) or "").strip()
            if not reason:
                return _json(400, {"error": f"a rejection needs a reason (the {REASON_HEADER} header)"})
            state = self.reviews.reject(job_id, reason, who)
        except ReviewRefused as exc:
            return _json(404 if exc.missing else 409, {"error": str(exc)})
        job = self.state.job(job_id)
        return _json(200, {"job": job_id, "state": state.value, "review": "rejected",
                           "reason": job.reason if job else None})

    def _audit_refusal(self, job_id: int, action: str, client: str, answer: Response) -> None:
        status = answer[0]
        try:
            error = json.loads(answer[1]).get("error")
        except ValueError:
            error = None
        job = self.state.job(job_id) if status not in (401, 403, 429) else None
        self.audit.record_review(who={"address": client, "role": "status page"},
                                 decision="approved" if action == "approve" else "rejected", ok=False,
                                 job_id=job_id, status=status, reason=error,
                                 study=job.series.study_instance_uid if job else None,
                                 series=job.series.series_instance_uid if job else None)


class _Unavailable(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _seg_file(job: Job) -> Path | None:
    """The first file of the job's SEG in the spool (``results/<job>/<key>/``): the object
    named ``seg`` first, else any other SEG of the job; None when it made none."""
    if job.result_path is None:
        return None
    folder = job.result_path.parent.parent
    if folder.name != str(job.id) or not folder.is_dir():
        return None
    import pydicom

    for objects in sorted(folder.iterdir(), key=lambda path: (path.name != "seg", path.name)):
        files = sorted(objects.glob("*.dcm")) if objects.is_dir() else []
        try:
            if files and str(pydicom.dcmread(files[0], stop_before_pixels=True,
                                             specific_tags=["SOPClassUID"]).SOPClassUID) in _SEG_CLASSES:
                return files[0]
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError):
            continue
    return None
