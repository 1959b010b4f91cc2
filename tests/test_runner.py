"""The warm model runner: one load for many series, a dead runner restarted once, no
model process left behind by a node that is killed."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from pipeline.errors import SegmentationError
from pipeline.input.nifti import volume_to_nifti
from pipeline.input.preprocess import PreprocessingMode, preprocess
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume
from pipeline.model.runner import ModelRunner
from pipeline.settings import ModelSettings
from tests.support.wait import process_alive

SERIES = ("t1_philips_3t_mprage_sag", "t1_siemens_3t_fl2d_sag_hfs")


@pytest.fixture(scope="module")
def settings(phantom_weights, tmp_path_factory):
    return ModelSettings(weights_dir=phantom_weights, home_dir=tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def images(mri_dir):
    result = []
    for name in SERIES:
        volume = read_volume(load_series(sorted((mri_dir / name).glob("*.dcm"))))
        inverted = preprocess(volume.array, PreprocessingMode.INVERT_BLACK_BACKGROUND,
                              clip_min=0, clip_max=3000, background_percentile=1)
        result.append(volume_to_nifti(volume.with_array(inverted)))
    return result


@pytest.mark.e2e
def test_five_series_in_a_row_load_the_model_once(settings, images):
    with ModelRunner(settings) as runner:
        reports = []
        for n in range(5):
            reply = runner.run(images[n % 2])
            assert np.asanyarray(reply.labels.dataobj).any(), "the phantom model finds structures"
            reports.append(reply.report)
        assert runner.loads == 1, "the runner's own load counter"
        assert [r.loads for r in reports] == [1] * 5
        assert reports[0].load_seconds > 0 and all(r.load_seconds == 0 for r in reports[1:])
        assert runner.starts == 1
        assert len({r.worker for r in reports}) == 1


@pytest.mark.e2e
def test_a_runner_that_dies_is_started_again_and_the_request_retried_once(settings, images):
    with ModelRunner(settings) as runner:
        runner.run(images[1])
        first = runner.pid
        killer = threading.Timer(0.5, os.kill, (first, signal.SIGKILL))  # dies during the next request
        killer.start()
        reply = runner.run(images[1])
        killer.join()
        assert runner.starts == 2 and runner.pid != first
        assert np.asanyarray(reply.labels.dataobj).any()
        assert runner.loads == 2, "the new process loaded the model again"


def test_a_second_death_fails_the_request_with_the_reason(settings, images):
    with ModelRunner(settings) as runner:
        runner.start()
        stop = threading.Event()

        def keep_killing():  # every runner process dies as soon as it appears
            seen = set()
            while not stop.is_set():
                pid = runner.pid
                if pid is not None and pid not in seen:
                    seen.add(pid)
                    os.kill(pid, signal.SIGKILL)
                stop.wait(0.05)

        killer = threading.Thread(target=keep_killing)
        killer.start()
        try:
            with pytest.raises(SegmentationError, match=r"died twice.*exit code -9"):
                runner.run(images[0])
        finally:
            stop.set()
            killer.join()


def test_the_model_process_dies_with_a_killed_parent(settings, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from pipeline.model.runner import ModelRunner
        from pipeline.settings import ModelSettings
        if __name__ == "__main__":
            runner = ModelRunner(ModelSettings(weights_dir=Path({str(settings.weights_dir)!r}),
                                               home_dir=Path({str(settings.home_dir)!r})))
            runner.start()
            print(runner.pid, flush=True)
            sys.stdin.read()  # until killed
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=os.getcwd())
    child = int(parent.stdout.readline())
    assert process_alive(child)
    parent.kill()
    parent.wait()
    _wait_until_gone(child, seconds=5)


def _wait_until_gone(pid: int, seconds: float) -> None:
    gone = threading.Event()
    for _ in range(int(seconds / 0.1)):
        if not process_alive(pid):
            return
        gone.wait(0.1)
    raise AssertionError(f"the model process {pid} is still alive {seconds}s after its parent was killed")


def test_an_error_from_the_model_process_becomes_only_a_pipeline_error():
    from pipeline.errors import SegmentationError, WeightsMissingError, error_of_kind

    assert type(error_of_kind("WeightsMissingError", "gone")) is WeightsMissingError
    for kind in ("annotations", "__all__", "error_of_kind", "SystemExit", "os"):
        error = error_of_kind(kind, "odd")
        assert type(error) is SegmentationError and str(error) == "odd"


def test_gpu_ready_settings_are_checked_when_read():
    import pydantic

    settings = ModelSettings()
    assert (settings.tta, settings.step_size, settings.compile) == (True, None, False), "the model's own choices"
    assert ModelSettings(step_size=0.8, tta=False, compile=True).step_size == 0.8
    for wrong in ({"step_size": 0}, {"step_size": 1.5}, {"tta": "sometimes"}, {"compile": "maybe"}):
        with pytest.raises(pydantic.ValidationError):
            ModelSettings(**wrong)


@pytest.mark.e2e
def test_tta_false_turns_the_mirroring_off_and_still_gives_a_label_map(phantom_weights, images, tmp_path,
                                                                       monkeypatch):
    """In this process (the predictor is looked at): a custom nnU-Net model, mirrored by
    nnU-Net's default, and not with ``tta: false``; both give a label map of the image."""
    from demo.phantom_model import make_custom_model
    from pipeline.model.nnunet import NnUNetBackend

    monkeypatch.setenv("nnUNet_compile", "false")  # the predictors set it here: put back afterwards
    weights = tmp_path / "custom"
    base = ModelSettings(kind="nnunet", nnunet_model=make_custom_model(phantom_weights, weights), weights_dir=weights,
                         step_size=0.9)
    image = images[1]  # the 35 slices
    passes = {}
    for tta in (True, False):
        backend = NnUNetBackend(base.model_copy(update={"tta": tta}))
        backend.run(image)  # the predictor is made on the first run
        [predictor] = backend.predictors.initialised
        assert predictor.use_mirroring is tta and predictor.tile_step_size == 0.9
        # the phantom was trained without mirroring (its checkpoint allows no axis): allow
        # the three, as a model trained with nnU-Net's default does, so that tta has work
        predictor.allowed_mirroring_axes = (0, 1, 2)
        calls = []
        hook = predictor.network.register_forward_hook(lambda *_: calls.append(1))
        try:
            reply = backend.run(image)
        finally:
            hook.remove()
        labels = np.asanyarray(reply.labels.dataobj)
        assert labels.shape == image.shape and np.allclose(reply.labels.affine, image.affine, atol=1e-4)
        assert labels.any() and set(np.unique(labels).tolist()) - {0} <= set(reply.names)
        passes[tta] = len(calls)
    # the network's forward passes, counted: mirroring on three axes makes eight of each tile
    assert passes[False] >= 1 and passes[True] == 8 * passes[False], passes
