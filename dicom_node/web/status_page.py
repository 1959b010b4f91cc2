"""The status page (``http.ui: true``): what an operator sees of the node in a browser.

Served by the HTTP endpoint (``dicom_node.web.http``), from the node itself (plain HTML,
CSS and a little JavaScript in ``dicom_node/static``; nothing from the internet):

* ``GET /`` the page; ``GET /static/NAME`` its script and style sheet: a shell without
  data, which asks for the token and sends it as ``Authorization: Bearer TOKEN`` on
  its reads (never in a URL);
* ``GET /api/jobs[?state=S...]`` the jobs as JSON (``job_record`` per job, plus the
  series description and the destination), newest first;
* ``GET /api/jobs/ID/preview.png`` the source series' middle slice with the
  structures of the job's SEG drawn over it (``render_preview``), computed on request
  from the spool; only from MR and CT images without burned-in annotation
  (``PREVIEW_SOP_CLASSES``), and not at all with ``http.ui_previews: false``;
* ``POST /api/jobs/ID/retry`` queues a job again (a failed job as ``dicom-node retry``,
  any other ended job as ``retry --reprocess``);
* ``/review/ID`` and ``/api/jobs/ID/review``, ``.../approve``, ``.../reject``: the review
  view of a job whose objects wait for a reviewer (``dicom_node.web.review``, asked first).

Reads (``/api/...``) need the action token or the read-only token
(``http.ui_read_token_file``), unless ``http.ui_public_read``; the retry needs the action
token (``http.ui_token_file`` or ``http.ui_token_env``). Without a token the answer is
401, with a wrong one 403 (and, after a few, 429: ``dicom_node.web.access``); nothing is
queued then.

The page and its data carry UIDs, AE titles and series descriptions only, never a
patient's name, ID or birth date.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dicom_node.audit import Audit
from dicom_node.config import Destination
from dicom_node.store.state import Job, JobState, OutboxCounts, OutboxItem, StateStore
from dicom_node.web.access import Gate, Need, PageTokens
from dicom_node.web.http import Response
from dicom_node.web.pull_page import PullPage
from dicom_node.web.review import ReviewPage
from pipeline.masking import PATIENT_KEYWORDS, PatientMask, cut

if TYPE_CHECKING:
    import numpy as np

    from dicom_node.pull.runner import PullRunner
    from dicom_node.work.review import Reviews
    from PIL import Image

__all__ = ["StatusPage", "job_record", "iso_time", "render_preview", "overlay", "middle_image",
           "PREVIEW_SOP_CLASSES", "NoPreview"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
_STATIC_FILES = {
    "token.js": "text/javascript; charset=utf-8",  # the token field, shared with the review view
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
    "pull.js": "text/javascript; charset=utf-8",  # the pulls (web/pull_page)
}
_JOB_PATH = re.compile(r"^/api/jobs/(\d+)/(preview\.png|retry)$")
_OVERLAY_ALPHA = 0.5
# The only objects a preview is drawn from: MR and CT images (a secondary capture, an
# ultrasound or a photo may carry burned-in demographics, and is never shown).
PREVIEW_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
})
# Colours for segments whose SEG gives none (tab10).
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def iso_time(timestamp: float | None) -> str | None:
    """ISO 8601 in UTC, to the second; None stays None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def job_record(job: Job, now: float, outbox: Sequence[OutboxItem] = ()) -> dict:
    """A job as ``status --json`` and the status page show it, with its outbox rows: no patient data."""
    return {
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "last_error": job.last_error,
        "attempts": job.attempts,
        "sequence_class": job.sequence_class,
        "preprocessing": job.preprocessing,
        "study_instance_uid": job.series.study_instance_uid,
        "series_instance_uid": job.series.series_instance_uid,
        "seg_series_instance_uid": job.seg_series_uid,
        "calling_ae_title": job.series.calling_ae_title,
        "reprocess_of": job.reprocess_of,
        "created_at": iso_time(job.created_at),
        "updated_at": iso_time(job.updated_at),
        "age_seconds": round(now - job.created_at, 1),
        "received_at": iso_time(job.received_at),
        "completed_at": iso_time(job.completed_at),
        "queued_at": iso_time(job.queued_since),
        "processing_at": iso_time(job.processing_at),
        "processed_at": iso_time(job.processed_at),
        "sent_at": iso_time(job.sent_at),
        "next_attempt_at": iso_time(job.next_attempt_at) if job.state is JobState.SENDING else None,
        "durations": job.stage_seconds(),
        "model_run": job.model_run,
        "model_outcomes": job.model_outcomes.splitlines() if job.model_outcomes else [],
        "routing": job.routing,
        "sends": [{"destination": item.destination, "object": item.object, "state": item.state.value,
                   "attempts": item.attempts, "last_error": item.last_error, "warning": item.warning,
                   "sent_at": iso_time(item.sent_at),
                   "next_attempt_at": iso_time(item.next_attempt_at) if item.state.value == "pending" else None}
                  for item in outbox],
    }


# -- the preview ----------------------------------------------------------------------------

_GEOMETRY_TAGS = ["SOPClassUID", "BurnedInAnnotation", "Rows", "Columns", "NumberOfFrames", "InstanceNumber",
                  "ImageOrientationPatient", "ImagePositionPatient", "SharedFunctionalGroupsSequence",
                  "PerFrameFunctionalGroupsSequence"]


class NoPreview(ValueError):
    """The series holds nothing a preview may be drawn from (no MR or CT image, or only
    images marked BurnedInAnnotation YES)."""


def _previewable(ds) -> bool:
    return (str(ds.get("SOPClassUID", "")) in PREVIEW_SOP_CLASSES
            and str(ds.get("BurnedInAnnotation", "") or "").strip().upper() != "YES")


def middle_image(paths: list[Path]) -> tuple[Path, int | None]:
    """The middle image of a series: (file, frame index for a multi-frame object, else None).

    Only MR and CT images without burned-in annotation count (``NoPreview`` when there
    are none). Classic images are ordered along their slice normal (by InstanceNumber
    where the geometry is missing), frames of a multi-frame object by their plane positions.
    """
    import numpy as np
    import pydicom

    images = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_GEOMETRY_TAGS)
        if "Rows" in ds and "Columns" in ds and _previewable(ds):
            images.append((path, ds))
    if not images:
        raise NoPreview("the series holds no MR or CT image without burned-in annotation")
    multi = [(path, ds) for path, ds in images if int(ds.get("NumberOfFrames") or 1) > 1]
    if multi:
        path, ds = max(multi, key=lambda item: int(item[1].NumberOfFrames))
        frames = int(ds.NumberOfFrames)
        try:
            orientation = np.array(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                                   .ImageOrientationPatient, dtype=float)
            normal = np.cross(orientation[:3], orientation[3:])
            keys = [float(np.dot(normal, np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)))
                    for item in ds.PerFrameFunctionalGroupsSequence]
            order = sorted(range(frames), key=lambda n: keys[n])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            order = list(range(frames))
        return path, order[len(order) // 2]

    def position(item: tuple[Path, pydicom.Dataset]) -> tuple[float, float]:
        ds = item[1]
        number = float(ds.get("InstanceNumber") or 0)
        try:
            orientation = np.array(ds.ImageOrientationPatient, dtype=float)
            normal = np.cross(orientation[:3], orientation[3:])
            return float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))), number
        except (AttributeError, TypeError, ValueError):
            return number, number

    ordered = sorted(images, key=position)
    return ordered[len(ordered) // 2][0], None


def overlay(pixels: "np.ndarray", labels: "np.ndarray | None", colours: dict[int, tuple[int, int, int]],
            aspect: float = 1.0) -> "Image.Image":
    """A grey image (1st to 99th percentile) with each label drawn over it in its colour.

    ``labels`` has the shape of ``pixels`` (0: nothing); ``aspect`` is the row spacing
    over the column spacing, so that the picture has square pixels.
    """
    import numpy as np
    from PIL import Image

    values = np.asarray(pixels, dtype=np.float32)
    low, high = np.percentile(values, (1, 99)) if values.size else (0.0, 1.0)
    grey = np.clip((values - low) / max(float(high - low), 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if labels is not None:
        if labels.shape != values.shape:
            raise ValueError(f"labels {labels.shape} do not match the image {values.shape}")
        for number in sorted(int(n) for n in np.unique(labels) if n):
            colour = np.array(colours.get(number, _PALETTE[(number - 1) % len(_PALETTE)]), dtype=np.float32)
            mask = labels == number
            rgb[mask] = (1 - _OVERLAY_ALPHA) * rgb[mask] + _OVERLAY_ALPHA * colour
    image = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    if abs(aspect - 1.0) > 0.01:
        image = image.resize((image.width, max(1, round(image.height * aspect))), Image.Resampling.BILINEAR)
    return image


def _seg_labels(seg_path: Path, source, frame: int | None) -> tuple["np.ndarray | None", dict]:
    """The SEG's segments on one source image (or frame), as one label image, and their colours."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    colours = {}
    for item in seg.SegmentSequence:
        value = item.get("RecommendedDisplayCIELabValue")
        if value is not None:
            colours[int(item.SegmentNumber)] = hd.color.CIELabColor.from_dicom_value(tuple(value)).to_rgb()
    uid = str(source.SOPInstanceUID)
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for series in seg.ReferencedSeriesSequence for item in series.ReferencedInstanceSequence}
    if uid not in referenced:
        return None, colours  # the SEG was made from other images
    options = dict(combine_segments=True, skip_overlap_checks=True, assert_missing_frames_are_empty=True)
    try:
        if frame is None:
            labels = seg.get_pixels_by_source_instance([uid], **options)[0]
        else:
            labels = seg.get_pixels_by_source_frame(uid, [frame + 1], **options)[0]
    except (KeyError, ValueError, RuntimeError) as exc:
        # no frame of the SEG lies on this image (empty frames are left out): nothing to draw
        log.debug("preview: no segment on %s: %s", uid, exc)
        return None, colours
    return labels, colours


def render_preview(paths: list[Path], seg_path: Path | None) -> bytes:
    """PNG of the series' middle image with the SEG's structures over it (if a SEG is given)."""
    import pydicom
    from pydicom.pixels import pixel_array

    path, frame = middle_image(paths)
    source = pydicom.dcmread(path)
    if not _previewable(source):  # the file changed since middle_image read it
        raise NoPreview("the series holds no MR or CT image without burned-in annotation")
    pixels = pixel_array(source, index=frame) if frame is not None else source.pixel_array
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)  # a colour image: its brightness
    labels, colours = (None, {}) if seg_path is None else _seg_labels(seg_path, source, frame)
    spacing = _pixel_spacing(source, frame)
    image = overlay(pixels, labels, colours, aspect=spacing[0] / spacing[1] if spacing else 1.0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixel_spacing(ds, frame: int | None) -> tuple[float, float] | None:
    try:
        if "PixelSpacing" in ds:
            spacing = ds.PixelSpacing
        else:
            groups = ds.SharedFunctionalGroupsSequence[0]
            if frame is not None and "PixelMeasuresSequence" not in groups:
                groups = ds.PerFrameFunctionalGroupsSequence[frame]
            spacing = groups.PixelMeasuresSequence[0].PixelSpacing
        row, column = float(spacing[0]), float(spacing[1])
        return (row, column) if row > 0 and column > 0 else None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


# -- the page -------------------------------------------------------------------------------

def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(status, (json.dumps(body) + "\n").encode(), "application/json", headers)


class StatusPage:
    """The status page's routes over the state store (see the module docstring)."""

    def __init__(self, state: StateStore, destinations: Sequence[Destination], tokens: PageTokens | Gate,
                 static_dir: Path = STATIC, *, previews: bool = True, audit: Audit | None = None,
                 reviews: Reviews | None = None, pulls: PullRunner | None = None) -> None:
        """``reviews``: the review decisions the review view takes (None: it only shows);
        ``pulls``: the node's pulls, which ``/api/pulls`` starts and shows (``web.pull_page``;
        None: no sources configured)."""
        self.state = state
        self.audit = audit or Audit.off()
        self.destinations = tuple(destinations)
        self.gate = tokens if isinstance(tokens, Gate) else Gate(tokens)
        self.previews = previews
        self.static_dir = static_dir
        self._lock = threading.Lock()
        self._descriptions: dict[str, str | None] = {}
        self._previews: OrderedDict[tuple, bytes] = OrderedDict()
        self.pulls = None if pulls is None else PullPage(pulls, self.gate, audit=self.audit)
        self.review = ReviewPage(state, self.gate, static_dir, reviews=reviews, previews=previews, audit=self.audit,
                                 describe=self._description)

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers, client: str = "") -> Response | None:
        reviewed = self.review.handle(method, path, query, headers, client)  # the review view's own routes
        if reviewed is not None:
            return reviewed
        pulled = self.pulls.handle(method, path, query, headers, client) if self.pulls is not None else None
        if pulled is not None:  # the pulls' own routes
            return pulled
        if method == "GET" and path in ("/", "/ui", "/ui/"):
            return self._static("index.html", "text/html; charset=utf-8")  # the shell: no data
        if method == "GET" and path.startswith("/static/"):
            name = path[len("/static/"):]
            return self._static(name, _STATIC_FILES[name]) if name in _STATIC_FILES else None
        if method == "GET" and path == "/api/jobs":
            return self._refused(headers, client, Need.READ, method, path) or self._jobs(
                query.get("state", []), self._acts(headers))
        match = _JOB_PATH.match(path)
        if match is None:
            return None
        job_id, action = int(match.group(1)), match.group(2)
        if action == "preview.png":
            if method != "GET":
                return _json(405, {"error": "use GET"})
            return self._refused(headers, client, Need.READ, method, path) or self._preview(job_id)
        if method != "POST":
            return _json(405, {"error": "use POST"}, {"Allow": "POST"})
        refused = self._refused(headers, client, Need.ACT, method, path)
        if refused is not None:
            log.warning("status page: retry of job %d from %s refused (HTTP %d)", job_id, client, refused[0])
            return self._audited(job_id, client, refused)
        return self._audited(job_id, client, self._retry(job_id))

    def _refused(self, headers, client: str, need: Need, method: str, path: str) -> Response | None:
        refusal = self.gate.check(headers, client, need, f"{method} {path}")
        return None if refusal is None else _json(refusal.status, {"error": refusal.error}, dict(refusal.headers))

    def _acts(self, headers) -> bool:
        """Whether the request's token may act (the page enables its buttons then)."""
        return self.gate.can_act(headers)

    def _static(self, name: str, kind: str) -> Response:
        return Response(200, (self.static_dir / name).read_bytes(), kind)

    # -- data ---------------------------------------------------------------------------
    def _jobs(self, states: list[str], acts: bool = False) -> Response:
        known = {state.value for state in JobState}
        unknown = [state for state in states if state not in known]
        if unknown:
            return _json(400, {"error": f"unknown state {unknown[0]!r}; one of {', '.join(sorted(known))}"})
        now = time.time()
        jobs = [job for job in self.state.jobs() if not states or job.state.value in states]
        outboxes = self.state.outboxes()
        records = []
        for job in reversed(jobs):
            record = job_record(job, now, outboxes.get(job.id, ()))
            record["series_description"] = self._description(job)
            records.append(record)
        outbox = self.state.outbox_counts()
        return _json(200, {
            "jobs": records,
            "destinations": [{"name": d.name, "peer": d.peer, "outputs": list(d.outputs),
                              **dataclasses.asdict(outbox.get(d.name, OutboxCounts()))} for d in self.destinations],
            "actions": self.gate.actions,
            "can_act": acts,
            "previews": self.previews,
            "states": [state.value for state in JobState],
            "now": iso_time(now),
        })

    def _description(self, job: Job) -> str | None:
        """The series' SeriesDescription, read once from one of its instances, through the
        patient mask of its header (``pipeline.masking``) and cut to one short line."""
        uid = job.series.series_instance_uid
        with self._lock:
            if uid in self._descriptions:
                return self._descriptions[uid]
        import pydicom

        description = None
        for path in self.state.instance_paths(uid, upto_seq=job.upto_seq)[:1]:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["SeriesDescription", *PATIENT_KEYWORDS])
                description = cut(PatientMask.of(ds)(str(ds.get("SeriesDescription") or ""))) or None
            except (OSError, pydicom.errors.InvalidDicomError):
                return None  # not cached: the file may come back (it was being written)
        with self._lock:
            if len(self._descriptions) > 10_000:
                self._descriptions.clear()
            self._descriptions[uid] = description
        return description

    def _preview(self, job_id: int) -> Response:
        if not self.previews:
            return _json(404, {"error": "previews are off (http.ui_previews: false)"})
        job = self.state.job(job_id)
        if job is None:
            return _json(404, {"error": f"no job {job_id}"})
        seg = job.result_path if job.result_path is not None and job.result_path.is_file() else None
        if seg is not None and not (seg.parent.name.startswith("seg") or seg.parent.name == str(job.id)):
            seg = None  # results/<job>/seg*/ (or, before the outbox, results/<job>/) holds a SEG; others do not
        key = (job.id, job.upto_seq, str(seg))
        with self._lock:
            cached = self._previews.get(key)
        if cached is None:
            paths = self.state.instance_paths(job.series.series_instance_uid, upto_seq=job.upto_seq)
            paths = [path for path in paths if path.is_file()]
            if not paths:
                return _json(404, {"error": f"job {job_id}: its instances are no longer in the spool"})
            try:
                cached = render_preview(paths, seg)
            except NoPreview as exc:
                return _json(404, {"error": f"job {job_id}: no preview: {exc}"})
            except (ValueError, AttributeError, RuntimeError, NotImplementedError) as exc:
                log.info("job %d: no preview: %s", job_id, exc)
                return _json(422, {"error": f"job {job_id}: no preview: {exc}"})
            with self._lock:
                self._previews[key] = cached
                while len(self._previews) > 64:
                    self._previews.popitem(last=False)
        return Response(200, cached, "image/png")

    # -- actions ------------------------------------------------------------------------
    def _audited(self, job_id: int, client: str, answer: Response) -> Response:
        """``answer``, after the audit event of the action (refused ones too), by the client's address."""
        status, body = answer[0], answer[1]
        try:
            detail = json.loads(body)
        except ValueError:
            detail = {}
        job = self.state.job(job_id) if status not in (401, 403, 429) else None
        self.audit.record_page_action(
            client=client, action="retry", ok=status == 202, job_id=job_id, status=status,
            study=job.series.study_instance_uid if job else None,
            series=job.series.series_instance_uid if job else None,
            new_job=detail.get("job") if status == 202 else None, reason=None if status == 202 else detail.get("error"))
        return answer

    def _retry(self, job_id: int) -> Response:
        job = self.state.job(job_id)
        if job is None:
            return _json(404, {"error": f"no job {job_id}"})
        try:
            queued = self.state.requeue(job_id) if job.state is JobState.FAILED else self.state.reprocess(job_id)
        except ValueError as exc:
            return _json(409, {"error": str(exc)})
        log.info("status page: job %d queued again as job %d (%s)", job_id, queued.id, queued.state.value)
        return _json(202, {"job": queued.id, "state": queued.state.value, "retry_of": job_id})
