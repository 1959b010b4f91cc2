"""docs/conformance.md must list exactly what the SCP and the SCU negotiate."""

import re

import pytest

from tests.support.paths import REPO

DOC = (REPO / "docs" / "conformance.md").read_text()


def _uids(section_start: str, section_end: str) -> list[str]:
    section = DOC[DOC.index(section_start):DOC.index(section_end)]
    return re.findall(r"^\|[^|]*\| `([0-9.]+)` \|", section, re.M)


def test_scp_sop_classes_match_the_code(scp):
    server = scp()
    negotiated = [str(c.abstract_syntax) for c in server.ae.supported_contexts]
    documented = _uids("### 3.2", "### 3.3")
    assert sorted(documented) == sorted(negotiated)


def test_processed_sop_classes_match_the_pipeline():
    from pipeline.input.series import MR_IMAGE_CLASSES

    section = DOC[DOC.index("### 3.2"):DOC.index("### 3.3")]
    documented = re.findall(r"^\|[^|]*\| `([0-9.]+)` \| yes \|$", section, re.M)
    assert sorted(documented) == sorted(str(uid) for uid in MR_IMAGE_CLASSES)


def test_scp_transfer_syntaxes_match_the_code(scp):
    server = scp()
    storage = [c for c in server.ae.supported_contexts if c.abstract_syntax != "1.2.840.10008.1.1"]
    syntaxes = {tuple(str(t) for t in c.transfer_syntax) for c in storage}
    assert len(syntaxes) == 1, "every storage SOP class takes the same transfer syntaxes"
    documented = re.findall(r"^\| [^|]+ \| `([0-9.]+)` \|$", DOC[DOC.index("### 3.3"):DOC.index("### 3.4")], re.M)
    assert documented == list(syntaxes.pop())


@pytest.mark.parametrize("segmentation_type", ["BINARY", "LABELMAP"])
def test_scu_context_matches_what_the_seg_writer_produces(t1_dir, segmentation_type):
    import numpy as np

    from pipeline.input.classify import Classification, SequenceClass
    from pipeline.input.preprocess import PreprocessingMode
    from pipeline.input.series import load_series
    from pipeline.input.volume import read_volume
    from pipeline.model.types import LabelMap
    from pipeline.outputs.options import SegOptions
    from pipeline.outputs.seg import encode_seg
    from pipeline.process import algorithm_for
    from pipeline.settings import PipelineSettings

    volume = read_volume(load_series(sorted(t1_dir.glob("*.dcm"))))
    labels = np.zeros((35, 256, 256), np.uint16)
    labels[3:5, 10:20, 10:20] = 90
    seg = encode_seg(LabelMap(labels, {90: "brain"}, volume), algorithm_for(
        PipelineSettings(), PreprocessingMode.INVERT_BLACK_BACKGROUND, Classification(SequenceClass.T1, True, "t")),
        SegOptions(segmentation_type))
    section = DOC[DOC.index("## 4. SCU"):DOC.index("## 5.")]
    row = re.search(rf"^\| [^|]+ \| `{re.escape(str(seg.SOPClassUID))}` \| [^|`]+`([0-9.]+)` \|$", section, re.M)
    assert row, f"{seg.SOPClassUID} is not documented"
    assert row.group(1) == seg.file_meta.TransferSyntaxUID
