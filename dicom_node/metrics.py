"""Prometheus metrics of one node (its own registry, no globals).

Counters rise as things happen (instances received, series by outcome, send attempts
and failures); stage durations are histograms; jobs by state and the queue depth are
read from the state store when ``/metrics`` is scraped, so they are always true.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from dicom_node.store.state import JobState, StateStore

__all__ = ["Metrics"]


class _JobCollector:
    def __init__(self, state: StateStore, metrics: "Metrics") -> None:
        self.state = state
        self.metrics = metrics

    def collect(self):
        counts = self.state.job_counts()
        jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state, 0))
        yield jobs
        outbox = GaugeMetricFamily("dicom_node_outbox", "Result objects per destination: pending (of jobs still"
                                   " sending), sent, failed, held (for a reviewer)", labels=["destination", "state"])
        for destination, row in self.state.outbox_counts().items():
            for state in ("pending", "sent", "failed", "held"):
                outbox.add_metric([destination, state], getattr(row, state))
        yield outbox
        depth = counts.get(JobState.RECEIVED, 0) + counts.get(JobState.SENDING, 0)
        yield GaugeMetricFamily("dicom_node_queue_depth", "Jobs waiting for the worker or a send", value=depth)
        yield GaugeMetricFamily("dicom_node_tasks_in_flight", "Series being segmented now",
                                value=counts.get(JobState.PROCESSING, 0))
        if self.metrics.worker_queue_depth is not None:
            waiting = self.metrics.worker_queue_depth()
            if waiting is not None:
                yield GaugeMetricFamily("dicom_node_worker_queue_depth",
                                        "Segmentation tasks waiting in Redis for a GPU worker", value=waiting)


class Metrics:
    def __init__(self, state: StateStore | None = None) -> None:
        self.registry = CollectorRegistry()
        self.instances_received = Counter(
            "dicom_node_instances_received", "Instances stored by C-STORE", registry=self.registry
        )
        self.instances_refused = Counter(
            "dicom_node_instances_refused", "Instances refused at C-STORE, by the status answered", ["status"],
            registry=self.registry,
        )
        self.series_incomplete = Counter(
            "dicom_node_series_incomplete", "Series that ended failed because they were known not whole"
            " (instances refused, a slice count not reached, a gap) after completion.incomplete_grace_seconds",
            registry=self.registry,
        )
        self.series_outcomes = Counter(
            "dicom_node_series", "Processed series by outcome", ["outcome"], registry=self.registry
        )
        self.stage_seconds = Histogram(
            "dicom_node_stage_seconds", "Time per pipeline stage", ["stage"], registry=self.registry,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.model_seconds = Histogram(
            "dicom_node_model_seconds", "Model time per series, as the model process reports it: load (0 when"
            " warm), forward (the network), overhead (the rest: resampling, I/O)", ["part"],
            registry=self.registry, buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        self.model_runs = Counter(
            "dicom_node_model_runs", "Series segmented, by model process (worker) and device", ["worker", "device"],
            registry=self.registry,
        )
        self.send_attempts = Counter("dicom_node_send_attempts", "Send attempts of result objects, by destination",
                                     ["destination"], registry=self.registry)
        self.send_failures = Counter("dicom_node_send_failures", "Failed send attempts, by destination and kind of"
                                     " failure", ["destination", "kind"], registry=self.registry)
        self.retention_deletions = Counter(
            "dicom_node_retention_deletions", "Series deleted by retention with their jobs' results, by reason:"
            " period (their jobs' retention periods passed) or pressure (the spool's disk ran low)", ["reason"],
            registry=self.registry,
        )
        self.notices = Counter(
            "dicom_node_notices", "Webhook notices by webhook and outcome: delivered, failed (refused by the"
            " receiver, or not taken within its retry_seconds) or dropped (its queue was full)", ["webhook", "outcome"],
            registry=self.registry,
        )
        self.notice_attempt_failures = Counter(
            "dicom_node_notice_attempt_failures", "Webhook POSTs that failed (each is tried again until its"
            " retry_seconds), by webhook", ["webhook"], registry=self.registry,
        )
        self.notices_waiting = Gauge(
            "dicom_node_notices_waiting", "Webhook notices not yet delivered, by webhook", ["webhook"],
            registry=self.registry,
        )
        self.worker_queue_depth: Callable[[], int | None] | None = None  # set with Celery workers
        if state is not None:
            self.registry.register(_JobCollector(state, self))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
