"""Shared fixtures: a tiny real dataset, a tiny trained and exported model, and a real server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Cache folder for the tiny preset's simulated scenarios (simulated once per test session)."""
    return str(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def tiny_cfg(tiny_cache: str):
    from training.config import load_config

    return load_config("tiny", overrides=[f"data.cache_dir={tiny_cache}"])


@pytest.fixture(scope="session")
def tiny_data(tiny_cfg):
    from plant.scenarios import generate

    return generate(tiny_cfg.data, progress=False)


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory: pytest.TempPathFactory, tiny_cache: str, tiny_data) -> tuple[Path, str]:
    """A model store holding one tiny model trained and exported by the real CLI, promoted to current."""
    from training.run import main

    store = tmp_path_factory.mktemp("store")
    runs = tmp_path_factory.mktemp("runs")
    rc = main(
        ["--preset", "tiny", "--store", str(store), "--run-dir", str(runs / "v1"), f"data.cache_dir={tiny_cache}"]
    )
    assert rc == 0
    return store, "v1"


@pytest.fixture
def store_copy(trained_store: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    """A private copy of the trained store that a test may change."""
    src, version = trained_store
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst, version


def clone_version(store: Path, version: str, name: str) -> str:
    """Copy a stored version under a new name (its card renamed, and its checksum file rewritten, as training
    writes it): a second, distinct valid version."""
    from modelcard.card import read_card, write_card

    shutil.copytree(store / version, store / name)
    card = read_card(store / name, verify=False)
    card["version"] = name
    write_card(store / name, card)
    return name


def wait_for(predicate: Callable[[], object], seconds: float = 20.0) -> bool:
    """Poll ``predicate`` until it is true or ``seconds`` pass; returns its last value as a bool."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, store: Path | None, cwd: Path = ROOT, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **{k: v for k, v in os.environ.items() if k != "KOVAE_MODEL_STORE"},
            **({"KOVAE_MODEL_STORE": str(store)} if store is not None else {}),
            "KOVAE_HOST": "127.0.0.1",
            "KOVAE_PORT": str(self.port),
            "KOVAE_POLL_INTERVAL_S": "0",
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # Drain the log as it comes: a server writing a line per request into a full pipe would block.
        self.output: list[bytes] = []
        self.reader = threading.Thread(target=lambda: self.output.extend(iter(self.proc.stdout.readline, b"")))
        self.reader.start()
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.reader.join(timeout=5)
                raise RuntimeError(f"server exited: {b''.join(self.output).decode()[-2000:]}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("server did not start in 60 s")

    def stop(self) -> str:
        """Stop the server; returns everything it logged."""
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)
        return b"".join(self.output).decode()


@pytest.fixture
def serve() -> Iterator:
    """Start real servers (``python -m service``) on 127.0.0.1; all are stopped at the end of the test."""
    servers: list[Server] = []

    def start(store: Path | None, **env: str) -> Server:
        servers.append(Server(store, **env))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server(serve, trained_store):
    """A real server of the tiny model, with an admin key."""
    store, _ = trained_store
    return serve(store, KOVAE_ADMIN_API_KEYS='["admin-secret"]')


@pytest.fixture
def rt(trained_store):
    """The tiny model through ONNX Runtime, as the service runs it."""
    from modelcard.runtime import ModelRuntime

    store, version = trained_store
    return ModelRuntime(store / version)
