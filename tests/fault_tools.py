"""Tools for the fault tests: a tiny training setup, a server switch, an error-injecting proxy."""

import http.server
import os
import re
import threading
import time
from pathlib import Path

import keras
import numpy as np


def tiny_data(samples=64, features=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype("float32")
    y = rng.integers(0, classes, size=samples).astype("int64")
    return x, y


def tiny_model(features=8, classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input(shape=(features,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(classes)]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model, epochs, callbacks, initial_epoch=0):
    x, y = tiny_data()
    return model.fit(
        x, y, epochs=epochs, initial_epoch=initial_epoch, batch_size=16,
        validation_data=(x[:16], y[:16]), callbacks=callbacks, verbose=0,
    )


def tree_size(folder) -> int:
    """Return the total size in bytes of the files under `folder` (0 if it is missing)."""
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def models_folder(artifact_root, experiment_id) -> Path:
    """Where MLflow 3 stores an experiment's LoggedModel files under an artifact root."""
    return Path(artifact_root) / str(experiment_id) / "models"


def metric_steps(client, run_id, key) -> list:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


class ServerSwitch(keras.callbacks.Callback):
    """A Keras callback that stops an `MlflowServer` after one epoch and starts it after another.

    Put it before `MlflowCheckpoint` in `callbacks`, so the checkpoint of the
    stop epoch is the first to meet the outage.
    """

    def __init__(self, server, stop_after, start_after=None, outage_epoch_seconds=0.5):
        super().__init__()
        self.server = server
        self.stop_after = stop_after
        self.start_after = start_after
        self.outage_epoch_seconds = outage_epoch_seconds
        self.down = False

    def on_epoch_end(self, epoch, logs=None):
        completed = epoch + 1
        if completed == self.stop_after:
            self.server.stop()
            self.down = True
        elif completed == self.start_after:
            self.server.start()
            self.down = False
        if self.down:
            # Give the upload worker time to fail and back off during the outage.
            time.sleep(self.outage_epoch_seconds)


class ErrorProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to `target` and can replace responses with errors.

    `fail_once(method, path_pattern)` lets a matching request reach the
    server as usual but sends the client a 503 instead of the response, so
    the client gets a failure for work the server has done. `on_failure` (if set) runs
    just before that 503 is sent. `requests` lists `(method, path, status)`.
    """

    def __init__(self, target: str):
        import requests

        self.target = target.rstrip("/")
        self.session = requests.Session()
        self.rules = []
        self.requests = []
        self.on_failure = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                proxy.handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_once(self, method: str, path_pattern: str, skip: int = 0) -> None:
        """Respond with a 503, once, to the matching request that follows the first `skip` matches."""
        with self.lock:
            self.rules.append([method, re.compile(path_pattern), skip])

    def _take_rule(self, method, path) -> bool:
        with self.lock:
            for rule in self.rules:
                if rule[0] == method and rule[1].search(path):
                    if rule[2] > 0:
                        rule[2] -= 1
                        return False
                    self.rules.remove(rule)
                    return True
        return False

    def handle(self, handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {
            key: value
            for key, value in handler.headers.items()
            if key.lower() not in ("host", "content-length", "connection", "accept-encoding")
        }
        response = self.session.request(
            handler.command, self.target + handler.path, data=body, headers=headers,
            allow_redirects=False, timeout=120,
        )
        status, content = response.status_code, response.content
        content_type = response.headers.get("Content-Type", "application/json")
        path = handler.path.split("?")[0]
        if self._take_rule(handler.command, path):
            if self.on_failure is not None:
                self.on_failure(handler.command, path)
            status = 503
            content = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected by the test proxy"}'
            content_type = "application/json"
        with self.lock:
            self.requests.append((handler.command, path, status))
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
