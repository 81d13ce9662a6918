"""The benchmark scripts still run against the code they measure (timings themselves are not tested)."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_moe_benchmark_checks_all_three_formulations_at_flux_shapes():
    run = benchmark("moe.py", "--tokens", "24", "--repeats", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines[3:7]] == [
        ["ff.net.2", "1"],
        ["ff.net.2", "2"],
        ["proj_out", "1"],
        ["proj_out", "2"],
    ]
    assert lines[-1].startswith("speedup ") and float(lines[-1].split()[1]) > 0


def test_edit_benchmark_compares_the_official_call_with_ours_on_the_same_picture():
    run = benchmark("edit.py", "--steps", "1", "--repeats", "1", "--only", "ours,ours+merged")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.strip().splitlines()[2:-1]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (name, f"512x{height}", str(1024 // 16 * height // 16))  # diptych tokens
        for height in (256, 512, 768)
        for name in ("baseline", "ours", "ours+merged")
    ]
    assert all(int(row[-1]) <= 2 for row in rows)  # max |diff| in 8-bit levels: the same edit every way
    assert run.stdout.strip().splitlines()[-1].startswith("speedup ")


def test_grammar_benchmark_prints_both_decoders_per_token_cost():
    run = benchmark("grammar.py", "--quick", "--seeds", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[1].split()[:5] == ["seed", "unconstrained", "constrained", "overhead", "mask"]
    seed, plain, constrained, *_ = lines[2].split()
    assert seed == "0" and float(plain) > 0 and float(constrained) > 0
    assert " yes (" in lines[2]  # the random model's constrained answer is a valid plan
    assert lines[-2].startswith("per token: median ") and lines[-1].startswith("share of a 20 ms decode step")


def test_the_gpu_kits_grammar_check_runs_its_7b_shaped_model_narrowed_on_a_cpu():
    """Check e (`--full`) at 2 layers of 128: the same code path as on the GPU, where it would cost
    device time to find a bug."""
    run = benchmark(
        "grammar.py", "--full", "--layers", "2", "--hidden", "128", "--tokens", "8", "--repeats", "1"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    title, header, row = run.stdout.strip().splitlines()
    assert title.startswith("Qwen2.5-VL-7B-shaped language model (2 layers of 128") and "on the CPU" in title
    assert header.split() == ["unconstrained", "constrained", "overhead", "mask", "valid", "plan"]
    label, plain, constrained, overhead, mask, *valid = row.split()
    assert label == "less" and float(plain) > 0 and float(constrained) > 0 and float(mask) > 0
    assert " ".join(valid) == "cut short (8 tokens)"  # a plan takes more: the run stops at --tokens
