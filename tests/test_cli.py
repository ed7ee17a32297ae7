"""The `mlflow-ckpt` command line, against a local SQLite store and a real `mlflow server`.

Most commands run in-process through click's test runner; the checks about
exit codes, stderr and timing run the installed `mlflow-ckpt` executable.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

import mlflow_ckpt
from conftest import VENV_BIN, free_port
from helpers import tiny_data, tiny_model
from mlflow_ckpt import snapshot
from mlflow_ckpt.cli import _FAIL_FAST_HTTP_SETTINGS, cli

EPOCHS = 4


@dataclasses.dataclass
class Backend:
    """A tracking store for the CLI to talk to, and where its artifact files live on disk."""

    name: str
    uri: str
    experiment_id: str
    server_artifacts: Path | None

    def folder_of(self, model_id: str) -> Path:
        """Return the folder on disk with the files of LoggedModel `model_id`."""
        location = mlflow.MlflowClient(self.uri).get_logged_model(model_id).artifact_location
        if location.startswith("mlflow-artifacts:"):
            return self.server_artifacts / location.split(":", 1)[1].lstrip("/")
        return Path(location.removeprefix("file://"))


def train_tiny_run(backend: Backend, epochs: int = EPOCHS) -> str:
    """Train a tiny model with a checkpoint every epoch and return the run id."""
    mlflow.set_tracking_uri(backend.uri)
    x, y = tiny_data()
    model = tiny_model()
    with mlflow.start_run(experiment_id=backend.experiment_id) as run:
        model.fit(
            x, y, epochs=epochs, batch_size=32, verbose=0, validation_data=(x[:20], y[:20]),
            callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, input_example=x[:2])],
        )
    return run.info.run_id


def invoke(backend: Backend, *arguments):
    """Run `mlflow-ckpt --tracking-uri URI ARGUMENTS` in-process and return click's result."""
    # Passing the HTTP settings as None makes the runner restore them afterwards,
    # so the fail-fast values the CLI sets do not leak into other tests.
    environment = {name: None for name in _FAIL_FAST_HTTP_SETTINGS}
    return CliRunner().invoke(
        cli, ["--tracking-uri", backend.uri, *arguments], env=environment, catch_exceptions=False
    )


def run_executable(*arguments, tracking_uri: str, timeout: float = 120):
    """Run the installed `mlflow-ckpt` command in a new process."""
    environment = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    for name in _FAIL_FAST_HTTP_SETTINGS:
        environment.pop(name, None)
    return subprocess.run(
        [os.path.join(VENV_BIN, "mlflow-ckpt"), *arguments],
        capture_output=True, text=True, timeout=timeout, env=environment,
    )


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path / "staging"))


@pytest.fixture(scope="module", params=["local", "server"])
def backend(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cli-{request.param}")
    if request.param == "local":
        uri, server_artifacts = f"sqlite:///{root / 'mlflow.db'}", None
    else:
        server = request.getfixturevalue("mlflow_server")
        uri, server_artifacts = server.url, server.artifacts_dir
    experiment_id = mlflow.MlflowClient(uri).create_experiment(
        f"cli-{request.param}-{root.name}",
        artifact_location=None if server_artifacts else str(root / "artifacts"),
    )
    yield Backend(request.param, uri, experiment_id, server_artifacts)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def trained_run(backend, tmp_path_factory):
    """A finished run with a checkpoint at each of epochs 1..4, shared by read-only tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path_factory.mktemp("staging")))
        return train_tiny_run(backend)


# list


def test_list_table_has_every_epoch(backend, trained_run):
    result = invoke(backend, "list", trained_run)

    lines = result.stdout.splitlines()
    assert result.exit_code == 0, result.output
    assert lines[0].split()[:5] == ["EPOCH", "STEP", "STATUS", "FORMAT", "SIZE"]
    assert "val_loss" in lines[0]
    assert [line.split()[0] for line in lines[1:EPOCHS + 1]] == ["1", "2", "3", "4"]
    assert all(" READY " in line for line in lines[1:EPOCHS + 1])


def test_list_json_epochs_in_order(backend, trained_run):
    result = invoke(backend, "list", trained_run, "--json")

    records = json.loads(result.stdout)
    assert [record["epoch"] for record in records] == [1, 2, 3, 4]
    assert {record["status"] for record in records} == {"READY"}
    assert all("val_loss" in record["metrics"] for record in records)
    assert all(record["model_uri"].startswith("models:/m-") for record in records)


def test_list_marks_mid_epoch_checkpoint(backend):
    mlflow.set_tracking_uri(backend.uri)
    x, y = tiny_data()
    with mlflow.start_run(experiment_id=backend.experiment_id) as run:
        # 100 samples in batches of 32 make 4 steps per epoch, so step 6 is 2 steps into epoch 2.
        tiny_model().fit(
            x, y, epochs=2, batch_size=32, verbose=0,
            callbacks=[mlflow_ckpt.MlflowCheckpoint(save_freq=6, save_last=False)],
        )

    table = invoke(backend, "list", run.info.run_id)
    records = json.loads(invoke(backend, "list", run.info.run_id, "--json").stdout)

    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[1].split()[:4] == ["1", "+2", "steps", "6"]
    assert [(r["epoch"], r["steps_into_epoch"], r["global_step"]) for r in records] == [(1, 2, 6)]


def test_list_unknown_run_one_line(backend):
    completed = run_executable("list", "no-such-run", tracking_uri=backend.uri)

    assert completed.returncode != 0
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert "no-such-run" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_bad_option_one_line(backend):
    result = invoke(backend, "list", "some-run", "--jsn")

    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--jsn" in result.stderr


def test_dead_server_fails_fast():
    dead_url = f"http://127.0.0.1:{free_port()}"

    started = time.monotonic()
    completed = run_executable("list", "any-run", tracking_uri=dead_url)
    elapsed = time.monotonic() - started

    assert completed.returncode == 1
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert "Cannot reach the MLflow tracking server" in completed.stderr
    assert dead_url in completed.stderr
    # Nothing listens on the port, so the connection is refused rather than timed out.
    assert "(connection refused)" in completed.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s"


# show


def test_show_json_describes_checkpoint(backend, trained_run):
    result = invoke(backend, "show", trained_run, "--epoch", "2", "--json")

    description = json.loads(result.stdout)
    assert description["checkpoint"]["epoch"] == 2
    assert description["lineage"]["run_id"] == trained_run
    assert "data/model.keras" in description["manifest"]["files"]
    assert description["manifest"]["versions"]["keras"]
    assert description["signature"]["inputs"][0]["tensor-spec"]["shape"] == [-1, 8]


def test_show_text_defaults_to_latest(backend, trained_run):
    result = invoke(backend, "show", trained_run)

    assert result.exit_code == 0, result.output
    assert "  epoch        4" in result.stdout
    assert "latest" in result.stdout
    assert "val_loss" in result.stdout
    assert "data/model.keras" in result.stdout


def test_show_uri_only(backend, trained_run):
    result = invoke(backend, "show", trained_run, "--uri")

    latest = mlflow_ckpt.latest_checkpoint(trained_run, tracking_uri=backend.uri)
    assert result.stdout.strip() == latest.model_uri


def test_show_missing_epoch_lists_epochs(backend, trained_run):
    result = invoke(backend, "show", trained_run, "--epoch", "7")

    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "epoch 7" in result.stderr
    assert "[1, 2, 3, 4]" in result.stderr


# verify


def test_verify_run_all_ok(backend, trained_run):
    result = invoke(backend, "verify", trained_run)

    assert result.exit_code == 0, result.output
    assert result.stdout.count("  OK") == EPOCHS
    assert "All 4 checkpoint(s) match" in result.stdout


def test_verify_names_corrupt_file(backend):
    run_id = train_tiny_run(backend, epochs=2)
    bad = mlflow_ckpt.get_checkpoint(run_id, 1, tracking_uri=backend.uri)
    model_file = backend.folder_of(bad.model_id) / "data" / "model.keras"
    model_file.write_bytes(b"not a keras file")

    result = invoke(backend, "verify", run_id)

    assert result.exit_code == 1
    assert f"epoch 1  {bad.model_uri}  FAILED" in result.stdout
    assert "data/model.keras" in result.stdout
    assert "  OK" in result.stdout  # epoch 2 is intact
    assert "1 of 2 checkpoint(s) failed verification" in result.stderr


def test_verify_local_folder(backend, trained_run, tmp_path):
    checkpoint = mlflow_ckpt.latest_checkpoint(trained_run, tracking_uri=backend.uri)
    folder = shutil.copytree(backend.folder_of(checkpoint.model_id), tmp_path / "copy")

    result = invoke(backend, "verify", str(folder))

    assert result.exit_code == 0, result.output
    assert "All 1 checkpoint(s) match" in result.stdout


# promote


def test_promote_registers_copy(backend, trained_run):
    name = f"cli-promote-{backend.name}"

    result = invoke(backend, "promote", trained_run, "--epoch", "2", "--name", name, "--alias", "champion")

    client = mlflow.MlflowClient(backend.uri)
    version = client.get_model_version_by_alias(name, "champion")
    source = mlflow_ckpt.get_checkpoint(trained_run, 2, tracking_uri=backend.uri)
    assert result.exit_code == 0, result.output
    assert f"models:/{name}/{version.version}" in result.stdout
    assert version.tags["mlflow_ckpt.source_model_id"] == source.model_id
    assert version.tags["mlflow_ckpt.epoch"] == "2"
    assert version.model_id != source.model_id
    assert version.run_id == trained_run


def test_promote_predicts_like_checkpoint(backend, trained_run):
    name = f"cli-predict-{backend.name}"
    invoke(backend, "promote", trained_run, "--epoch", "3", "--name", name)
    x, _ = tiny_data()

    registered = mlflow_ckpt.load_model(f"models:/{name}/1")
    checkpoint = mlflow_ckpt.load_checkpoint(trained_run, epoch=3, tracking_uri=backend.uri)

    np.testing.assert_allclose(registered.predict(x, verbose=0), checkpoint.predict(x, verbose=0), rtol=1e-6)


def test_promote_converts_to_savedmodel(server_tracking, mlflow_server, tmp_path):
    backend = Backend("server", mlflow_server.url, "0", mlflow_server.artifacts_dir)
    run_id = train_tiny_run(backend, epochs=1)

    result = invoke(backend, "promote", run_id, "--name", "cli-savedmodel", "--format", "savedmodel")

    local = mlflow.artifacts.download_artifacts("models:/cli-savedmodel/1", dst_path=str(tmp_path))
    predictions = mlflow.pyfunc.load_model(local).predict(tiny_data()[0][:3])
    assert result.exit_code == 0, result.output
    assert "format savedmodel" in result.stdout
    assert (Path(local) / "data" / "saved_model" / "saved_model.pb").is_file()
    assert np.asarray(predictions).shape == (3, 3)


def test_promoted_version_survives_prune(backend):
    run_id = train_tiny_run(backend, epochs=3)
    invoke(backend, "promote", run_id, "--epoch", "1", "--name", f"cli-survivor-{backend.name}")

    invoke(backend, "prune", run_id, "--keep-last", "1")

    model = mlflow_ckpt.load_model(f"models:/cli-survivor-{backend.name}/1")
    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id, tracking_uri=backend.uri)] == [3]
    assert model.predict(tiny_data()[0][:2], verbose=0).shape == (2, 3)


# prune


def test_prune_dry_run_deletes_nothing(backend):
    run_id = train_tiny_run(backend)
    before = mlflow_ckpt.list_checkpoints(run_id, tracking_uri=backend.uri)

    result = invoke(backend, "prune", run_id, "--keep-last", "1", "--dry-run")

    after = mlflow_ckpt.list_checkpoints(run_id, tracking_uri=backend.uri)
    assert result.exit_code == 0, result.output
    assert [c.model_id for c in after] == [c.model_id for c in before]
    assert all(backend.folder_of(c.model_id).is_dir() for c in before)
    assert "Would delete epoch 1" in result.stdout
    assert "Would delete epoch 3" in result.stdout


def test_prune_deletes_exactly_dry_run_list(backend):
    run_id = train_tiny_run(backend)
    before = mlflow_ckpt.list_checkpoints(run_id, tracking_uri=backend.uri)
    best = mlflow_ckpt.best_checkpoint(run_id, "val_loss", tracking_uri=backend.uri)
    folders = {c.epoch: backend.folder_of(c.model_id) for c in before}
    dry_run = invoke(backend, "prune", run_id, "--keep-last", "1", "--keep-every", "2", "--dry-run")
    announced = {int(line.split()[3]) for line in dry_run.stdout.splitlines() if line.startswith("Would delete")}

    result = invoke(backend, "prune", run_id, "--keep-last", "1", "--keep-every", "2")

    remaining = {c.epoch for c in mlflow_ckpt.list_checkpoints(run_id, tracking_uri=backend.uri)}
    assert result.exit_code == 0, result.output
    assert announced == {1, 3} - {best.epoch}  # epochs 2 and 4 are kept by the rules
    assert remaining == {c.epoch for c in before} - announced
    assert not any(folders[epoch].exists() for epoch in announced)
    assert all(folders[epoch].is_dir() for epoch in remaining)


def test_prune_keeps_best(backend):
    run_id = train_tiny_run(backend)
    best = mlflow_ckpt.best_checkpoint(run_id, "val_loss", tracking_uri=backend.uri)

    invoke(backend, "prune", run_id, "--keep-best", "1", "--monitor", "val_loss")

    remaining = mlflow_ckpt.list_checkpoints(run_id, tracking_uri=backend.uri)
    assert {c.epoch for c in remaining} == {best.epoch, EPOCHS}


def test_prune_keeps_directly_registered(backend):
    run_id = train_tiny_run(backend, epochs=3)
    first = mlflow_ckpt.get_checkpoint(run_id, 1, tracking_uri=backend.uri)
    mlflow.register_model(first.model_uri, f"cli-direct-{backend.name}")

    result = invoke(backend, "prune", run_id, "--keep-last", "1")

    remaining = {c.epoch for c in mlflow_ckpt.list_checkpoints(run_id, tracking_uri=backend.uri)}
    assert result.exit_code == 0, result.output
    assert f"Keeping epoch 1  {first.model_uri}: registered as models:/cli-direct-{backend.name}/1" in result.stdout
    assert 1 in remaining
    assert 2 not in remaining


def test_prune_without_rule_rejected(backend, trained_run):
    result = invoke(backend, "prune", trained_run)

    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--keep-last" in result.stderr


def test_prune_running_run_rejected(backend):
    run = mlflow.MlflowClient(backend.uri).create_run(backend.experiment_id)

    result = invoke(backend, "prune", run.info.run_id, "--keep-last", "1")

    assert result.exit_code == 1
    assert "RUNNING" in result.stderr
    assert "--force" in result.stderr


# upload


def stage_left_behind(backend: Backend, folder, epoch: int):
    """Stage one complete checkpoint of a new run in `folder`, as a crash leaves it; return the run."""
    run = mlflow.MlflowClient(backend.uri).create_run(backend.experiment_id)
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    staged = snapshot.write_snapshot(
        model, staging_dir=str(folder), run_id=run.info.run_id,
        experiment_id=backend.experiment_id, epoch=epoch, steps_into_epoch=0,
        metrics={"loss": 0.5}, format="keras",
    )
    snapshot.complete_snapshot(staged)
    return run


def test_upload_commits_staged_snapshot(backend, tmp_path):
    run = stage_left_behind(backend, tmp_path / "left-behind", epoch=7)

    result = invoke(backend, "upload", "--staging-dir", str(tmp_path / "left-behind"))

    checkpoints = mlflow_ckpt.list_checkpoints(run.info.run_id, tracking_uri=backend.uri)
    assert result.exit_code == 0, result.output
    assert [c.epoch for c in checkpoints] == [7]
    assert f"Committed epoch 7 as {checkpoints[0].model_uri}" in result.stdout
    assert "uploading 1 checkpoint(s)" in result.stderr
    assert snapshot.find_staged(str(tmp_path / "left-behind")) == []


def test_upload_prints_progress_once(backend, tmp_path):
    stage_left_behind(backend, tmp_path / "left-behind", epoch=3)

    completed = run_executable(
        "upload", "--staging-dir", str(tmp_path / "left-behind"), tracking_uri=backend.uri
    )

    assert completed.returncode == 0, completed.stderr
    # The uploader's INFO log is the progress line; the root logger must not repeat it.
    progress = [line for line in completed.stderr.splitlines() if "Committed checkpoint" in line]
    assert len(progress) == 1, completed.stderr
    assert progress[0].startswith("mlflow-ckpt: ")


def test_upload_nothing_staged(backend, tmp_path):
    result = invoke(backend, "upload", "--staging-dir", str(tmp_path / "empty"))

    assert result.exit_code == 0, result.output
    assert "Nothing to upload" in result.stdout


# train and resume (the packaged job; `tests/test_job.py` runs them through `mlflow run`)


def test_train_then_resume_on_server(server_tracking, mlflow_server):
    backend = Backend("server", mlflow_server.url, "0", mlflow_server.artifacts_dir)

    trained = invoke(backend, "train", "--epochs", "2", "--every-n-epochs", "1")
    run_id = trained.stdout.split("\nRun ")[1].split()[0]
    resumed = invoke(backend, "resume", run_id, "--epochs", "3")

    epochs = [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id, tracking_uri=backend.uri)]
    assert trained.exit_code == 0, trained.output
    assert resumed.exit_code == 0, resumed.output
    assert epochs == [1, 2, 3]
    assert "restored from epoch 3" in resumed.stdout
