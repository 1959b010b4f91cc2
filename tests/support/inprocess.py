"""The node in this process, for tests of its stages around a model: the model is a
stand-in (``FakeSegmenter``), the network peers it talks to are real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.config import parse_config
from dicom_node.service import Node
from pipeline.model.types import LabelMap
from tests.support.paths import free_port

__all__ = ["FakeSegmenter", "inprocess_node"]


class FakeSegmenter:
    """A 'brain' block on slices 5 to 9: enough for every writer, no model run."""

    def describe(self) -> str:
        return "fake"

    def segment(self, volume):
        array = np.zeros(volume.array.shape, np.uint16)
        array[5:10, 100:120, 100:120] = 90
        return LabelMap(array, {90: "brain"}, volume)


def inprocess_node(folder: Path, destination: Any, *, segmenter: Any = None, **overrides: dict) -> Node:
    """A node (not started) that sends to ``destination`` (a StoreSCP), with an HTTP
    port of its own, ``segmenter`` (default: ``FakeSegmenter``) and ``overrides`` by
    section of the config."""
    data: dict[str, dict] = {
        "node": {"port": free_port()},
        "security": {"allowed_callers": [{"ae_title": "MODALITY"}]},
        "destination": {"ae_title": destination.ae_title, "host": "127.0.0.1", "port": destination.port},
        "storage": {"min_free_bytes": 1_000_000},
        "completion": {"stable_seconds": 2},
        "http": {"port": free_port()},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return Node(parse_config(data, folder), segmenter=segmenter or FakeSegmenter())
