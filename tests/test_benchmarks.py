"""The benchmark scripts still run against the code they measure (timings themselves are not tested)."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_moe_benchmark_checks_all_three_formulations_at_flux_shapes():
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "moe.py"), "--tokens", "24", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines[3:7]] == [["ff.net.2", "1"], ["ff.net.2", "2"],
                                                         ["proj_out", "1"], ["proj_out", "2"]]
    assert lines[-1].startswith("speedup ") and float(lines[-1].split()[1]) > 0
