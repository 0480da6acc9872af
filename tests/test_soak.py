"""The soak run in small mode: load, faults and churn, then no leak (benchmarks/soak.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def test_soak_small_mode() -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--requests", "2000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all bars met" in result.stdout
    assert "get 200" in result.stdout and "dropped stream" in result.stdout
