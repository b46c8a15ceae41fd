"""Run the reliability soak (20 rounds, faults, SIGKILLs) and record its figures in benchmarks/SOAK.md.

Usage, from the repository root: `.venv/bin/python benchmarks/soak.py` (about 2-5 minutes on 2 cores).
The test itself only prints its figures; this script is what writes them into the tracked file. The test suite
leaves the soak out (marker `soak`): it takes minutes, and soaks belong here.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "benchmarks" / "SOAK.md"


def main() -> int:
    """Run the soak test with SOAK_FIGURES pointing at benchmarks/SOAK.md; returns pytest's exit code."""
    env = dict(os.environ, SOAK_FIGURES=str(TARGET))
    command = [sys.executable, "-m", "pytest", "-s", "-q", "-m", "soak", "tests/reliability/test_soak.py"]
    code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    if code == 0:
        sys.stdout.write(TARGET.read_text())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
