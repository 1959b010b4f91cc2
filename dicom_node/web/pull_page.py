"""The status page's pulls: start one (action token) and see each one's progress.

* ``GET /api/pulls`` (a read token): the sources, and the latest pulls with their
  arguments (patient ID and accession number shown as ``***``), who started them, their
  state and progress (series found, retrieved, processed, sent).
* ``POST /api/pulls?source=NAME&date=FROM-TO&...`` (the action token): starts a pull in
  the node (``pull.runner``) with the filters of ``dicom-node pull`` (``study``,
  ``accession``, ``patient_id``, ``date``, ``modality``, ``series_description``,
  ``reprocess=1``); 202 with its key. Audited as a page action, refused ones too.
"""

from __future__ import annotations

import json
import logging

from dicom_node.audit import Audit
from dicom_node.pull.common import PullFilter
from dicom_node.pull.puller import pull_progress
from dicom_node.pull.runner import PullRunner
from dicom_node.store.pulls import PullLog
from dicom_node.web.access import Gate, Need
from dicom_node.web.http import Response

__all__ = ["PullPage"]

log = logging.getLogger(__name__)

_PATH = "/api/pulls"
_MASKED = ("patient_id", "accession")  # patient strings: never shown


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(status, (json.dumps(body) + "\n").encode(), "application/json", headers)


class PullPage:
    """``/api/pulls``: its routes (see the module docstring)."""

    def __init__(self, runner: PullRunner, gate: Gate, *, audit: Audit | None = None) -> None:
        self.runner = runner
        self.pulls: PullLog = runner.pulls
        self.gate = gate
        self.audit = audit or Audit.off()

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers, client: str = "") -> Response | None:
        if path != _PATH:
            return None
        need = Need.READ if method == "GET" else Need.ACT
        if method not in ("GET", "POST"):
            return _json(405, {"error": "use GET or POST"}, {"Allow": "GET, POST"})
        refusal = self.gate.check(headers, client, need, f"{method} {path}")
        if refusal is not None:
            if method == "POST":
                self._audit(client, False, refusal.status, None, refusal.error)
            return _json(refusal.status, {"error": refusal.error}, dict(refusal.headers))
        return self._list(headers) if method == "GET" else self._start(query, client)

    def _list(self, headers) -> Response:
        running = self.runner.running()
        pulls = []
        for run in self.pulls.runs():
            arguments = {key: ("***" if key in _MASKED else value) for key, value in run.arguments.items()}
            pulls.append({"pull": run.pull_key, "arguments": arguments, "started_by": run.started_by,
                          "state": run.state, "reason": run.reason, "started_at": run.started_at,
                          "updated_at": run.updated_at, "running": run.pull_key in running,
                          "progress": pull_progress(self.pulls, run.pull_key).record()})
        return _json(200, {"sources": [source.name for source in self.runner.config.sources],
                           "actions": self.gate.actions, "can_act": self.gate.can_act(headers), "pulls": pulls})

    def _start(self, query: dict[str, list[str]], client: str) -> Response:
        def one(name: str) -> str | None:
            values = query.get(name) or [""]
            return values[-1].strip() or None

        sources = self.runner.config.sources
        name = one("source") or (sources[0].name if sources else None)
        try:
            filters = PullFilter(study_uid=one("study"), accession=one("accession"), patient_id=one("patient_id"),
                                 date=one("date"), modality=one("modality"),
                                 series_description=one("series_description"))
        except ValueError as exc:
            self._audit(client, False, 400, None, str(exc))
            return _json(400, {"error": str(exc)})
        try:
            key = self.runner.start(name or "", filters, one("reprocess") in ("1", "true", "yes"))
        except KeyError:
            error = f"no source {name!r}; sources are: {', '.join(s.name for s in sources) or 'none'}"
            self._audit(client, False, 404, filters.study_uid, error)
            return _json(404, {"error": error})
        self._audit(client, True, 202, filters.study_uid, None)
        return _json(202, {"pull": key, "source": name})

    def _audit(self, client: str, ok: bool, status: int, study: str | None, reason: str | None) -> None:
        self.audit.record_page_action(client=client, action="pull", ok=ok, job_id=None, status=status, study=study,
                                      reason=reason)
