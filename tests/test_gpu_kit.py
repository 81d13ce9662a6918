"""The GPU run kit (benchmarks/gpu/) on a CPU: its plan, its refusals, its results format and the
measuring code of plan_check.py, so that a lent GPU's few minutes are not spent finding a typo."""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu"
ENV = {**os.environ, "PYTHON": sys.executable}
CHECKS = [
    ("a", "python benchmarks/moe.py --device cuda"),
    (
        "b1",
        (
            "python benchmarks/edit.py --full --repeats 1 --only ours,offload-encoders,ours+fp8+offload-encoders,"
            "offload-model"
        ),
    ),
    (
        "b2",
        "python benchmarks/edit.py --full --compile --repeats 1 --only ours+merged+fused-qkv,ours+compile,ours+fp8",
    ),
    ("b3", "python benchmarks/edit.py --full --steps 4 --repeats 1 --only offload-sequential"),
    ("c", "python benchmarks/gpu/plan_check.py"),
    ("d", 'python -m pytest -q tests/test_engine.py -k "offload or cuda"'),
    ("e", "python benchmarks/grammar.py --full"),
]
PLANNED = re.compile(r"(\w+) +(\d+) s (.+)")
SKIPPED = re.compile(r"(\w+) +skip  (.+) \(\d+ s left for it, under the \d+ s it needs\)")


def sh(*args, **kw):
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, **kw)


def run_sh(*args, root=ROOT, env=ENV):
    return sh("bash", str(root / "benchmarks/gpu/run.sh"), *args, env=env)


def plan(*args, root=ROOT):
    """[(id, seconds or None when skipped, command)] from --dry-run, and its setup seconds."""
    run = run_sh("--dry-run", *args, root=root)
    assert run.returncode == 0, run.stderr
    header, *lines, _footer = run.stdout.strip().splitlines()
    rows = []
    for line in lines:
        if m := PLANNED.fullmatch(line):
            rows.append((m[1], int(m[2]), m[3]))
        else:
            m = SKIPPED.fullmatch(line)
            assert m, line
            rows.append((m[1], None, m[2]))
    return rows, int(re.search(r"\((\d+) s of it", header)[1])


def fake_repo(tmp_path, files):
    """A copy of run.sh in a tree of its own, beside `files` ({path: text})."""
    (tmp_path / "benchmarks/gpu").mkdir(parents=True)
    shutil.copy(KIT / "run.sh", tmp_path / "benchmarks/gpu/run.sh")
    (tmp_path / "tests").mkdir()
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    return tmp_path


def test_both_scripts_parse():
    for script in ("run.sh", "fetch_wheels.sh"):
        run = sh("bash", "-n", str(KIT / script))
        assert run.returncode == 0, run.stderr


def test_dry_run_lists_the_checks_in_priority_order_within_the_budget():
    rows, setup = plan()
    assert [(id_, cmd) for id_, _, cmd in rows[:7]] == CHECKS
    assert [id_ for id_, _, _ in rows[7:]] in ([], ["d2"])  # d2: CUDA-only tests that d leaves out, if any
    assert all(seconds > 0 for _, seconds, _ in rows)
    assert 540 - len(rows) <= sum(seconds for _, seconds, _ in rows) + setup <= 540  # stretched, rounded down


def test_a_short_budget_cuts_the_last_checks_and_a_subset_gets_the_whole_budget():
    rows, setup = plan("--budget", "200")
    assert [(id_, seconds is not None) for id_, seconds, _ in rows[:6]] == [
        ("a", True),
        ("b1", True),
        ("b2", False),
        ("b3", False),
        ("c", False),
        ("d", False),
    ]
    assert sum(seconds or 0 for _, seconds, _ in rows) <= 200 - setup

    rows, setup = plan("--only", "a,c", "--budget", "300")
    assert [id_ for id_, _, _ in rows] == ["a", "c"]
    assert [seconds for _, seconds, _ in rows] == [
        81,
        189,
    ]  # 30 and 70 stretched alike to the 270 s there are
    assert [id_ for id_, _, _ in plan("--only", "b")[0]] == ["b1", "b2", "b3"]


def test_bad_options_are_one_line_and_exit_2():
    ids = " ".join(id_ for id_, _, _ in plan()[0])
    for args, message in [
        (["--only", "x"], f"unknown check 'x' (checks: {ids})"),
        (["--budget", "ten"], "--budget must be a whole number of seconds over 40, not 'ten'"),
        (["--fast"], "unknown option '--fast'"),
    ]:
        run = run_sh(*args)
        assert (run.returncode, run.stdout) == (2, "")
        usage = "usage: bash benchmarks/gpu/run.sh [--budget SECONDS] [--only IDS] [--dry-run]"
        assert run.stderr.splitlines() == [f"run.sh: {message} ({usage})"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine run.sh would run the checks")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path):
    run = run_sh(env=ENV | {"OUT": str(tmp_path)})
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.splitlines() == [
        "run.sh: no CUDA GPU here (torch.cuda.is_available() is not true), so nothing ran; --dry-run prints the plan"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_cuda_only_test_that_d_does_not_select_runs_as_d2(tmp_path):
    marked = '@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")\n'
    root = fake_repo(
        tmp_path,
        {
            "tests/test_engine.py": f"{marked}def test_offload_on_gpu():\n    pass\n\n"
            f"{marked}def test_paints_on_gpu():\n    pass\n\ndef test_cpu():\n    pass\n",
            "tests/test_other.py": f"class TestGpu:\n    {marked}    def test_kernel(self):\n        pass\n",
        },
    )
    rows, _ = plan(root=root)
    assert rows[-1][0] == "d2" and rows[-1][1] > 0
    assert (
        rows[-1][2]
        == "python -m pytest -q tests/test_engine.py::test_paints_on_gpu tests/test_other.py::TestGpu::test_kernel"
    )
    assert [id_ for id_, _, _ in plan(root=fake_repo(tmp_path / "none", {}))[0]][-1] == CHECKS[-1][0]  # no d2


def test_each_check_is_recorded_as_results_md_takes_it(tmp_path):
    """run.sh's real path, on a CPU: torch answers that CUDA is there, and the check is a stand-in."""
    root = fake_repo(tmp_path / "repo", {"benchmarks/moe.py": "print('fake row')\nraise SystemExit(3)\n"})
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import torch\n\ntorch.cuda.is_available = lambda: True\n")
    out = tmp_path / "out"
    run = run_sh(
        "--only", "a", "--budget", "120", root=root, env=ENV | {"OUT": str(out), "PYTHONPATH": str(site)}
    )
    assert run.returncode == 1, run.stdout + run.stderr  # a check failed
    assert re.fullmatch(
        rf"Ran in \d+ s of 120: a exit 3\. Results: {out}/gpu-results\.md", run.stdout.splitlines()[-1]
    )
    head, check = (out / "gpu-results.md").read_text().split("\n### ")
    head = head.splitlines()
    assert head[0] == "## GPU run: `bash benchmarks/gpu/run.sh --budget 120 --only a`"
    machine = head[2]
    assert (
        machine.startswith("**")
        and f"Python {platform.python_version()}, torch {torch.__version__} " in machine
    )
    assert head[4].startswith("Kit wheels: none in benchmarks/gpu/wheels")
    lines = check.splitlines()
    assert lines[:7] == [
        "`python benchmarks/moe.py --device cuda`",
        "",
        machine,
        "",
        "```",
        "fake row",
        "```",
    ]
    assert re.fullmatch(r"Exit 3 after \d+ s \(limit \d+ s\)\.", lines[8])


def test_every_command_the_kit_names_takes_the_options_it_is_given():
    rows, _ = plan()
    for script in sorted({cmd.split()[1] for _, _, cmd in rows if cmd.split()[1].endswith(".py")}):
        helps = sh(sys.executable, script, "--help", cwd=ROOT)
        assert helps.returncode == 0, helps.stderr
        for _, _, cmd in rows:
            if cmd.split()[1] == script:
                for flag in re.findall(r"(?<= )--[\w-]+", cmd):
                    assert flag in helps.stdout, f"{script} has no {flag}"
    source = (ROOT / "benchmarks/edit.py").read_text()  # edit.py runs only the variants it knows, silently
    for _, _, cmd in rows:
        if "edit.py" in cmd:
            for variant in re.search(r"--only (\S+)", cmd)[1].split(","):
                assert f'"{variant}"' in source, f"edit.py has no variant {variant}"
    collected = sh(
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "tests/test_engine.py",
        "-k",
        "offload or cuda",
        cwd=ROOT,
    )
    assert "tests/test_engine.py::test_offload_encoders_paints_what_the_gpu_alone_paints" in collected.stdout


def test_plan_check_tiny_runs_every_component_at_the_engines_diptych_size():
    """The measuring code without the planner: each component's bytes, and the forwards' output shapes
    (1024x768 canvas: 3072 image tokens of 64 channels, T5's 512 tokens, CLIP's 77)."""
    from plugins.icedit.presets import build_tiny

    run = sh(sys.executable, str(KIT / "plan_check.py"), "--tiny")
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line.split(maxsplit=3)[1:] for line in run.stdout.splitlines()[2:]}
    pipe = build_tiny()
    shapes = {
        "text_encoder": (1, 77, 32),
        "text_encoder_2": (1, 512, 32),
        "vae": (1, 3, 768, 1024),
        "transformer": (1, 3072, 64),
    }
    assert rows == {
        name: [
            str(sum(p.numel() for p in getattr(pipe, name).parameters())),
            str(
                sum(
                    t.numel() * t.element_size()
                    for t in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]
                )
            ),
            str(shape),
        ]
        for name, shape in shapes.items()
    }
