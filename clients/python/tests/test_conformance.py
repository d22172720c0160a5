"""The conformance harness (the Rust scripted Leader) against this package's
driver, `python -m tandem_follower.conformance`: every case must pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict


def test_the_python_follower_passes_every_case(rust_bins: Dict[str, Path]) -> None:
    cases = subprocess.run(
        [str(rust_bins["harness"]), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    names = [line.split(" - ")[0] for line in cases]
    run = subprocess.run(
        [str(rust_bins["harness"]), "--", sys.executable, "-m", "tandem_follower.conformance"],
        capture_output=True,
        text=True,
        timeout=300,  # the harness kills its child at the end of every case
    )
    print(run.stdout)
    passed = [line[len("PASS "):] for line in run.stdout.splitlines() if line.startswith("PASS ")]
    assert passed == names, run.stdout
    assert run.returncode == 0
