"""Exact resume across processes, and SIGTERM (preemption) handling during fit.

The subprocess tests run `tests/resume_job.py`: the packaged digits model
with seed 0, EarlyStopping and ReduceLROnPlateau(patience=2), so a resume
that lost the optimizer, the dropout seed state, a callback's state, the
input order or the metric totals of an interrupted epoch ends with other
weights than uninterrupted training.
"""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

import mlflow_ckpt
from helpers import tiny_data, tiny_model
from mlflow_ckpt import snapshot, training_state
from mlflow_ckpt.preemption import PREEMPTED_EXIT_CODE

JOB = Path(__file__).with_name("resume_job.py")
EPOCHS = 4
BATCH_SIZE = 64  # 16 steps per epoch on the 1,000 training digits


class JobRunner:
    """Run `resume_job.py` in fresh processes against one SQLite store and staging folder."""

    def __init__(self, root: Path):
        self.root = root
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.staging_dir = root / "staging"

    def run(self, name: str, *arguments: str) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env["MLFLOW_CKPT_STAGING_DIR"] = str(self.staging_dir)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        out = self.root / f"{name}.npz"
        return subprocess.run(
            [sys.executable, str(JOB), str(out), "--epochs", str(EPOCHS),
             "--batch-size", str(BATCH_SIZE), *arguments],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=600,
        )

    def variables(self, name: str) -> list:
        with np.load(self.root / f"{name}.npz") as saved:
            return [saved[key] for key in saved.files]

    def run_id(self, name: str) -> str:
        return (self.root / f"{name}.npz.run_id").read_text()

    def history(self, run_id: str, key: str) -> list:
        client = mlflow.MlflowClient(self.tracking_uri)
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _check(result: subprocess.CompletedProcess, returncode: int = 0) -> None:
    assert result.returncode == returncode, result.stderr[-3000:]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    return JobRunner(tmp_path_factory.mktemp("resume-jobs"))


@pytest.fixture(scope="module")
def uninterrupted(jobs):
    _check(jobs.run("uninterrupted"))
    return jobs


@pytest.fixture(scope="module")
def preempted(jobs):
    """SIGTERM after batch 7 of epoch 3: the callback saves after batch 8, 9 steps in."""
    result = jobs.run("preempted", "--sigterm-at", "2:7")
    return result


@pytest.fixture(scope="module")
def resumed(uninterrupted, preempted):
    _check(preempted, PREEMPTED_EXIT_CODE)
    _check(uninterrupted.run("resumed", "--run-id", uninterrupted.run_id("preempted")))
    return uninterrupted


@pytest.mark.slow
def test_sigterm_exits_with_status_143(preempted):
    assert preempted.returncode == PREEMPTED_EXIT_CODE, preempted.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_commits_mid_epoch_checkpoint(jobs, preempted):
    mlflow.set_tracking_uri(jobs.tracking_uri)
    latest = mlflow_ckpt.latest_checkpoint(jobs.run_id("preempted"))
    mlflow.set_tracking_uri(None)
    assert (latest.epoch, latest.global_step) == (2, 2 * 16 + 9)


@pytest.mark.slow
def test_resume_after_sigterm_matches_uninterrupted(resumed):
    expected = resumed.variables("uninterrupted")
    actual = resumed.variables("resumed")
    assert len(actual) == len(expected)
    for index, (want, got) in enumerate(zip(expected, actual)):
        assert np.array_equal(want, got), f"variable {index} differs"


@pytest.mark.slow
@pytest.mark.parametrize("key", ["loss", "val_loss", "sparse_categorical_accuracy"])
def test_resume_after_sigterm_logs_same_history(resumed, key):
    expected = resumed.history(resumed.run_id("uninterrupted"), key)
    actual = resumed.history(resumed.run_id("preempted"), key)
    assert actual == expected


@pytest.mark.slow
def test_resume_pydataset_matches_uninterrupted(tmp_path):
    jobs = JobRunner(tmp_path)
    _check(jobs.run("uninterrupted", "--input", "pydataset"))
    _check(jobs.run("preempted", "--input", "pydataset", "--sigterm-at", "1:3"), PREEMPTED_EXIT_CODE)
    _check(jobs.run("resumed", "--input", "pydataset", "--run-id", jobs.run_id("preempted")))
    for index, (want, got) in enumerate(zip(jobs.variables("uninterrupted"), jobs.variables("resumed"))):
        assert np.array_equal(want, got), f"variable {index} differs"


# In-process tests.


@pytest.fixture
def staging(tmp_path, monkeypatch):
    folder = tmp_path / "staging"
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(folder))
    return folder


class SendSigterm(keras.callbacks.Callback):
    """Send SIGTERM to this process at the end of batch `batch` of epoch `epoch` (0-based)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.target = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.target:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_until_sigterm(epoch=1, batch=2, **checkpoint_options):
    x, y = tiny_data(samples=160)
    model = tiny_model()
    checkpoint = mlflow_ckpt.MlflowCheckpoint(**checkpoint_options)
    with pytest.raises(mlflow_ckpt.TrainingPreempted) as raised:
        model.fit(x, y, batch_size=16, epochs=3, callbacks=[checkpoint, SendSigterm(epoch, batch)], verbose=0)
    return raised.value, checkpoint


@pytest.mark.server
def test_sigterm_in_fit_raises_training_preempted(tracking, staging):
    preempted, _ = _fit_until_sigterm()
    assert (preempted.epoch, preempted.steps_into_epoch, preempted.unsent) == (1, 4, 0)


def test_sigterm_in_fit_restores_signal_handler(local_tracking, staging):
    before = signal.getsignal(signal.SIGTERM)
    _fit_until_sigterm()
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_in_fit_ends_started_run_killed(local_tracking, staging):
    preempted, _ = _fit_until_sigterm()
    assert mlflow.get_run(preempted.run_id).info.status == "KILLED"


def test_sigterm_checkpoint_has_no_partial_metrics(local_tracking, staging):
    preempted, _ = _fit_until_sigterm()
    latest = mlflow_ckpt.latest_checkpoint(preempted.run_id)
    assert dict(latest.metrics) == {}


def test_sigterm_before_first_step_saves_nothing(local_tracking, staging):
    x, y = tiny_data(samples=32)
    model = tiny_model()
    checkpoint = mlflow_ckpt.MlflowCheckpoint()

    class SigtermAtStart(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(mlflow_ckpt.TrainingPreempted):
        model.fit(x, y, epochs=2, callbacks=[checkpoint, SigtermAtStart()], verbose=0)
    assert mlflow_ckpt.list_checkpoints(checkpoint._run.info.run_id, include_pending=True) == []


def test_sigterm_without_handling_ends_process(local_tracking, staging):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        x, y = tiny_data(samples=32)
        model = tiny_model()
        checkpoint = mlflow_ckpt.MlflowCheckpoint(save_on_sigterm=False)

        class SigtermOnce(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 0 and not received:
                    os.kill(os.getpid(), signal.SIGTERM)

        model.fit(x, y, epochs=1, callbacks=[checkpoint, SigtermOnce()], verbose=0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]


def test_sigterm_after_failed_fit_reaches_previous_handler(local_tracking, staging):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        x, y = tiny_data(samples=32)
        model = tiny_model()

        class Fail(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                raise RuntimeError("training code failed")

        with pytest.raises(RuntimeError):
            model.fit(x, y, epochs=1, callbacks=[mlflow_ckpt.MlflowCheckpoint(), Fail()], verbose=0)
        os.kill(os.getpid(), signal.SIGTERM)
        handler_after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        while mlflow.active_run():
            mlflow.end_run()
    assert received == [signal.SIGTERM]
    assert handler_after is not None and handler_after != signal.SIG_DFL


def test_resume_in_process_matches_uninterrupted(local_tracking, staging):
    x, y = tiny_data(samples=160)
    keras.utils.set_random_seed(1)
    reference = tiny_model()
    reference.fit(x, y, batch_size=16, epochs=3, shuffle=True, verbose=0)

    keras.utils.set_random_seed(1)
    preempted, _ = _fit_until_sigterm(epoch=1, batch=2)
    keras.utils.set_random_seed(1)
    model = tiny_model()
    state = mlflow_ckpt.resume(preempted.run_id, model=model)
    model.fit(
        x, y, batch_size=16, epochs=3, shuffle=True, initial_epoch=state.initial_epoch,
        callbacks=[mlflow_ckpt.MlflowCheckpoint(resume_from=state)], verbose=0,
    )
    for index, (want, got) in enumerate(zip(reference.variables, model.variables)):
        assert np.array_equal(want.numpy(), got.numpy()), f"variable {want.path} differs"


def test_resume_rejects_other_steps_per_epoch(local_tracking, staging):
    preempted, _ = _fit_until_sigterm(epoch=1, batch=6)
    model = tiny_model()
    state = mlflow_ckpt.resume(preempted.run_id, model=model)
    x, y = tiny_data(samples=160)
    with pytest.raises(ValueError, match="steps per epoch"):
        model.fit(
            x, y, batch_size=80, epochs=3, initial_epoch=state.initial_epoch,
            callbacks=[mlflow_ckpt.MlflowCheckpoint(resume_from=state)], verbose=0,
        )


def test_resume_commits_staged_checkpoint(local_tracking, staging):
    x, y = tiny_data(samples=32)
    model = tiny_model()
    with mlflow.start_run() as run:
        model.fit(x, y, epochs=1, callbacks=[mlflow_ckpt.MlflowCheckpoint()], verbose=0)
    model.fit(x, y, epochs=1, verbose=0)
    # What a process killed between staging and upload leaves behind.
    left = snapshot.write_snapshot(
        model, staging_dir=str(staging), run_id=run.info.run_id,
        experiment_id=run.info.experiment_id, epoch=2, steps_into_epoch=0,
        metrics={}, format="keras",
    )
    snapshot.complete_snapshot(left, [])

    state = mlflow_ckpt.resume(run.info.run_id, model=tiny_model())
    assert state.initial_epoch == 2


def test_resume_commits_staged_checkpoint_once(local_tracking, staging):
    x, y = tiny_data(samples=32)
    model = tiny_model()
    with mlflow.start_run() as run:
        model.fit(x, y, epochs=1, callbacks=[mlflow_ckpt.MlflowCheckpoint()], verbose=0)
    left = snapshot.write_snapshot(
        model, staging_dir=str(staging), run_id=run.info.run_id,
        experiment_id=run.info.experiment_id, epoch=2, steps_into_epoch=0,
        metrics={}, format="keras",
    )
    snapshot.complete_snapshot(left, [])
    mlflow_ckpt.resume(run.info.run_id, model=tiny_model())
    mlflow_ckpt.resume(run.info.run_id, model=tiny_model())
    epochs = [c.epoch for c in mlflow_ckpt.list_checkpoints(run.info.run_id, include_pending=True)]
    assert epochs == [1, 2]


# Units of the training state.


def test_random_states_round_trip():
    states = training_state.capture_random_states()
    expected = (random.random(), np.random.random())
    training_state.restore_random_states(states)
    assert (random.random(), np.random.random()) == expected


def test_legacy_loop_state_files_read(tmp_path):
    import json

    stopper = keras.callbacks.EarlyStopping(patience=3)
    stopper.wait, stopper.best = 2, 0.25
    states = training_state.capture_random_states()
    training_state.write_loop_state(tmp_path, [stopper], states)
    current = training_state.read_callbacks(tmp_path), training_state.read_random_states(tmp_path)
    # Earlier versions wrote the same content as callbacks.json and random_states.json.
    loop_state = json.loads((tmp_path / training_state.LOOP_STATE_FILE).read_text())
    (tmp_path / training_state.LOOP_STATE_FILE).unlink()
    (tmp_path / "callbacks.json").write_text(json.dumps(loop_state["callbacks"]))
    (tmp_path / "random_states.json").write_text(json.dumps(loop_state["random_states"]))
    legacy = training_state.read_callbacks(tmp_path), training_state.read_random_states(tmp_path)

    assert current[0][0]["EarlyStopping:0"]["wait"] == 2
    assert json.dumps(legacy, default=str) == json.dumps(current, default=str)
    # No array-valued callback state, so no callbacks.npz.
    assert not (tmp_path / training_state.CALLBACK_ARRAYS_FILE).exists()


def test_capture_includes_metric_totals():
    x, y = tiny_data(samples=32)
    model = tiny_model()
    model.fit(x, y, epochs=1, verbose=0)
    state, arrays = training_state.capture(model, epoch=1)
    metric_arrays = [key for key in arrays if key.startswith("metrics/")]
    assert len(metric_arrays) == len(model.metrics_variables)
    assert len(state["metric_variables"]) == len(model.metrics_variables)


def test_restore_metrics_assigns_totals():
    x, y = tiny_data(samples=32)
    model = tiny_model()
    model.fit(x, y, epochs=1, verbose=0)
    state, arrays = training_state.capture(model, epoch=1)
    expected = model.get_metrics_result()["loss"].numpy()
    model.reset_metrics()
    training_state.restore_metrics(model, state, arrays)
    assert model.get_metrics_result()["loss"].numpy() == expected
