"""Fixtures: the repository's Rust binaries (built once per session with cargo)
and guards that kill every spawned process by its pid."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

REPO = Path(__file__).resolve().parents[3]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug"
BUILD_TIMEOUT = 1800


@pytest.fixture(scope="session")
def rust_bins() -> Dict[str, Path]:
    """The harness, the registry and the standalone example. Built with cargo
    unless TANDEM_SKIP_BUILD=1 (then they must already be in target/debug)."""
    if os.environ.get("TANDEM_SKIP_BUILD") != "1":
        for args in (
            ["cargo", "build", "-p", "tandem-conformance", "-p", "tandem-registry", "--bins"],
            ["cargo", "build", "-p", "tandem", "--example", "standalone"],
        ):
            subprocess.run(args, cwd=REPO, check=True, timeout=BUILD_TIMEOUT)
    bins = {
        "harness": TARGET / "tandem-conformance",
        "registry": TARGET / "tandem-registry",
        "standalone": TARGET / "examples" / "standalone",
    }
    for name, path in bins.items():
        if not path.exists():
            pytest.fail(f"{name} binary missing at {path}; build it or unset TANDEM_SKIP_BUILD")
    return bins


class Processes:
    """Spawned processes, each SIGKILLed (by pid) and reaped at the end of the test."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def spawn(self, args: List[str], **kwargs: object) -> subprocess.Popen:
        proc = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def processes() -> Iterator[Processes]:
    guard = Processes()
    try:
        yield guard
    finally:
        guard.kill_all()


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A short-pathed private (0700) directory: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
    path.chmod(0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
