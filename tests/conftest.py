"""Shared fixtures: real MLflow tracking stores and servers on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The venv's bin contains `mlflow` and `uvicorn`, and `mlflow models serve` finds uvicorn on PATH.
VENV_BIN = str(Path(sys.executable).parent)
if VENV_BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")

import mlflow  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0, process=None) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with code {process.returncode}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class MlflowServer:
    """A real `mlflow server` subprocess with proxied artifact storage."""

    def __init__(self, backend_uri: str, artifacts_dir: Path, log_path: Path):
        self.backend_uri = backend_uri
        self.artifacts_dir = artifacts_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "MlflowServer":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.artifacts_dir),
                "--serve-artifacts",
                "--workers", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for_http(self.url + "/health", timeout=120, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture
def local_tracking(tmp_path, monkeypatch):
    """A fresh SQLite tracking store with local artifacts, set as the tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with SQLite and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(
        f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log"
    ).start()
    yield server
    server.stop()


@pytest.fixture
def server_tracking(mlflow_server, tmp_path, monkeypatch):
    """Point this test at the shared `mlflow server` subprocess."""
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    yield mlflow_server.url
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(params=["local", "server"])
def tracking(request):
    """Run the test once against a local SQLite store and once against `mlflow server`."""
    return request.getfixturevalue(f"{request.param}_tracking")


def _postgres_bin_dir():
    """Return the newest `/usr/lib/postgresql/<version>/bin` that has initdb, or None."""
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


@pytest.fixture(scope="session")
def postgres_uri():
    """A throwaway PostgreSQL server on 127.0.0.1 with an empty `mlflow` database.

    Skips when PostgreSQL is not installed (tests/run.sh installs Debian's
    package as root), or fails when MLFLOW_CKPT_REQUIRE_ALL=1. PostgreSQL
    refuses to run as root, so as root it runs as the `postgres` user.
    """
    import shutil
    import tempfile

    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        message = "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb"
        if os.environ.get("MLFLOW_CKPT_REQUIRE_ALL") == "1":
            pytest.fail(message + " (MLFLOW_CKPT_REQUIRE_ALL=1).")
        pytest.skip(message)

    # Outside pytest's tmp folders: those are private to root, and the server runs as postgres.
    data_dir = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-postgres-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(data_dir, user="postgres", group="postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    log_path = data_dir / "server.log"

    def pg(tool, *args, **kwargs):
        return subprocess.run(
            as_user + [os.path.join(bin_dir, tool), *args], check=True, capture_output=True, **kwargs
        )

    pg("initdb", "-D", str(data_dir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg(
        "pg_ctl", "-D", str(data_dir / "data"), "-l", str(log_path), "-w", "-t", "60",
        "-o", f"-h 127.0.0.1 -p {port} -k {data_dir}", "start",
    )
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        # SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql:// URI; the test extra installs psycopg2.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        pg("pg_ctl", "-D", str(data_dir / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(data_dir, ignore_errors=True)
