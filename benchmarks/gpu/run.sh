#!/usr/bin/env bash
# The GPU run kit (benchmarks/gpu/README.md): on a CUDA machine, install the kit's wheels offline,
# print the machine's facts, then run the GPU checks in priority order within a time budget, each
# under its own timeout, teeing everything to $OUT/gpu-results.md (./gpu-results.md without $OUT).
#
#     bash benchmarks/gpu/run.sh [--budget SECONDS] [--only a,b1,c] [--dry-run]
#
# --budget: seconds for the whole run (default 540, so one device call of 600 s has room).
# --only: the checks to run, by id; a letter names them all (b = b1,b2,b3). --dry-run: print the plan.
set -uo pipefail
here=$PWD
cd "$(dirname "$0")/../.." || exit 2
kit=benchmarks/gpu
setup=30  # seconds kept for installing the wheels and printing the machine's facts

# id | seconds | floor | command, in priority order. With d2 (below) the seconds sum to the default
# budget less the setup; a larger budget, or fewer checks, stretches them alike. They make a schedule: each check may run until
# its planned end, so time one leaves goes to those after it, and a short budget cuts the last ones.
# A check with less time than its floor (what it needs to print anything useful) is skipped.
checks=(
    "a|30|15|python benchmarks/moe.py --device cuda"
    "b1|160|120|python benchmarks/edit.py --full --repeats 1 --only ours,offload-encoders,ours+fp8+offload-encoders,offload-model"
    "b2|120|90|python benchmarks/edit.py --full --compile --repeats 1 --only ours+merged+fused-qkv,ours+compile,ours+fp8"
    "b3|50|45|python benchmarks/edit.py --full --steps 4 --repeats 1 --only offload-sequential"
    "c|70|50|python benchmarks/gpu/plan_check.py"
    'd|20|15|python -m pytest -q tests/test_engine.py -k "offload or cuda"'
    "e|40|30|python benchmarks/grammar.py --full"
)

usage="usage: bash benchmarks/gpu/run.sh [--budget SECONDS] [--only IDS] [--dry-run]"
bad() { echo "run.sh: $1 ($usage)" >&2; exit 2; }
budget=540 only="" dry_run=0
while [ $# -gt 0 ]; do
    case $1 in
        --budget) [ $# -ge 2 ] || bad "--budget needs a number of seconds"; budget=$2; shift 2 ;;
        --only) [ $# -ge 2 ] || bad "--only needs check ids"; only=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) bad "unknown option '$1'" ;;
    esac
done
[[ $budget =~ ^[0-9]+$ ]] && [ "$budget" -gt $((setup + 10)) ] ||
    bad "--budget must be a whole number of seconds over $((setup + 10)), not '$budget'"

py=${PYTHON:-$(command -v python || command -v python3)}
[ -n "$py" ] || { echo "run.sh: no python or python3 on PATH (or set PYTHON)" >&2; exit 2; }
shim=$(mktemp -d)  # the commands say `python`: make it this interpreter
trap 'rm -rf "$shim"' EXIT
printf '#!/bin/sh\nexec "%s" "$@"\n' "$py" >"$shim/python"  # not a symlink: a venv's python finds its venv by its own path
chmod +x "$shim/python"
export PATH="$shim:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Any test marked CUDA-only that d does not select runs as d2.
mapfile -t cuda_tests < <(python - <<'EOF'
import ast
import pathlib
import re

CUDA_ONLY = re.compile(r"skipif\(not [\w.]*cuda\.is_available\(\)")  # skipped where there is no GPU

def cuda_only(node):
    return any(CUDA_ONLY.search(ast.unparse(d)) for d in node.decorator_list)

def in_d(path, name):  # what d's `-k "offload or cuda"` selects in tests/test_engine.py
    return path.name == "test_engine.py" and re.search("offload|cuda", name, re.I)

for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    tree = ast.parse(path.read_text())
    if any(isinstance(n, ast.Assign) and "pytestmark" in map(ast.unparse, n.targets)
           and CUDA_ONLY.search(ast.unparse(n.value)) for n in tree.body):
        print(path)
        continue
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            items = [(node.name, node)]
        elif isinstance(node, ast.ClassDef):
            items = [(node.name, node), *((f"{node.name}::{m.name}", m) for m in node.body
                                          if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))]
        else:
            continue
        for name, item in items:
            if cuda_only(item) and not in_d(path, name):
                print(f"{path}::{name}")
                break
EOF
)
[ ${#cuda_tests[@]} -eq 0 ] || checks+=("d2|20|10|python -m pytest -q ${cuda_tests[*]}")

selected=()
for check in "${checks[@]}"; do
    id=${check%%|*}
    if [ -z "$only" ] || [[ ,$only, == *",$id,"* || ,$only, == *",${id:0:1},"* ]]; then selected+=("$check"); fi
done
for want in ${only//,/ }; do
    known=0
    for check in "${checks[@]}"; do
        id=${check%%|*}
        [[ $want == "$id" || $want == "${id:0:1}" ]] && known=1
    done
    [ $known = 1 ] || bad "unknown check '$want' (checks: $(for c in "${checks[@]}"; do printf '%s ' "${c%%|*}"; done | sed 's/ $//'))"
done
[ ${#selected[@]} -gt 0 ] || bad "--only selects no check"

planned=0
for check in "${selected[@]}"; do
    seconds=${check#*|}; planned=$((planned + ${seconds%%|*}))
done
ends=() end=$setup
for check in "${selected[@]}"; do  # each check's planned end, in seconds from the start
    seconds=${check#*|}; seconds=${seconds%%|*}
    [ $((budget - setup)) -le $planned ] || seconds=$((seconds * (budget - setup) / planned))
    end=$((end + seconds)); [ $end -le "$budget" ] || end=$budget
    ends+=("$end")
done

if [ $dry_run = 1 ]; then
    echo "GPU checks in priority order, budget $budget s ($setup s of it for the wheels and the machine's facts):"
    now=$setup
    for i in "${!selected[@]}"; do
        IFS='|' read -r id _ floor cmd <<<"${selected[i]}"
        t=$((ends[i] - now))
        if [ $t -lt "$floor" ]; then
            printf '%-3s skip  %s (%d s left for it, under the %d s it needs)\n' "$id" "$cmd" "$t" "$floor"
        else
            printf '%-3s %4d s %s\n' "$id" "$t" "$cmd"
            now=${ends[i]}
        fi
    done
    echo "Each limit assumes every check before it used all of its own; time one leaves goes to those after it."
    exit 0
fi

if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "run.sh: no CUDA GPU here (torch.cuda.is_available() is not true), so nothing ran; --dry-run prints the plan" >&2
    exit 2
fi

out=${OUT:-$here}
mkdir -p "$out"
results=$out/gpu-results.md
log=$out/gpu-install.log
: >"$log"

# 1. The kit's wheels, offline. pip keeps a copy the device already has where it satisfies the
# requirement (constraints.txt's pins are installed as pinned); if the whole set cannot be resolved,
# each requirement is tried alone, then without its dependencies. The full pip output is in $log.
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1
wheels=$kit/wheels
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    pip=(python -m pip install --no-index --find-links "$wheels")
    failed=()
    if ! "${pip[@]}" -r "$wheels/requirements.txt" >>"$log" 2>&1; then
        while read -r req; do
            "${pip[@]}" "$req" >>"$log" 2>&1 || "${pip[@]}" --no-deps "$req" >>"$log" 2>&1 || failed+=("$req")
        done <"$wheels/requirements.txt"
    fi
    while read -r req; do
        "${pip[@]}" --no-deps "$req" >>"$log" 2>&1 || failed+=("$req")
    done <"$wheels/requirements-no-deps.txt"
    kept=$(python - "$wheels" <<'EOF'
import importlib.metadata as md
import pathlib
import sys

kept = []
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = "none"
    if have != version:
        kept.append(f"{name} {have} (kit {version})")
print(", ".join(kept) or "none")
EOF
)
    kit_line="Kit wheels installed offline${failed[*]:+, except ${failed[*]}}; the device's own version in use instead of the kit's: $kept."
else
    kit_line="Kit wheels: none in $wheels (fetch_wheels.sh was not run, or the folder was not carried); the device's packages as they are."
fi

# 2. The machine's facts: one line heads every check in the results.
machine=$(python - <<'EOF'
import datetime
import importlib.metadata as md
import os
import platform
import subprocess

import torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"

try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.splitlines()[0].split(", ")
    gpu = f"{gpu[0]} ({gpu[1]}, driver {gpu[2]})"
except (OSError, IndexError, subprocess.SubprocessError):
    try:
        gpu = f"{torch.cuda.get_device_name()} (no nvidia-smi)"
    except Exception as e:  # a fact that cannot be read is one, and the run goes on
        gpu = f"GPU unknown ({type(e).__name__}: {e})"
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.machine())
memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
packages = ", ".join(f"{name} {version(name)}" for name in ("diffusers", "transformers", "peft", "accelerate", "torchao"))
print(f"**{gpu}, {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB**, {datetime.date.today()}, "
      f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {packages}")
EOF
) || machine="(the machine's facts could not be read: see the output above)"
{
    echo "## GPU run: \`bash benchmarks/gpu/run.sh --budget $budget${only:+ --only $only}\`"
    echo
    echo "$machine"
    echo
    echo "$kit_line"
} | tee "$results"

# 3. The checks.
status=0
summary=()
for ((i = 0; i < ${#selected[@]}; i++)); do
    IFS='|' read -r id _ floor cmd <<<"${selected[i]}"
    t=$((ends[i] - SECONDS))
    printf '\n### `%s`\n\n' "$cmd" | tee -a "$results"
    if [ $t -lt "$floor" ]; then
        echo "Skipped: $t s were left for it, under the $floor s it needs." | tee -a "$results"
        summary+=("$id skipped")
        continue
    fi
    printf '%s\n\n```\n' "$machine" >>"$results"
    start=$SECONDS
    timeout -k 5 $((t - 5)) bash -c "$cmd" 2>&1 | tee -a "$results"
    rc=${PIPESTATUS[0]}
    took=$((SECONDS - start))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        verdict="Timed out at its limit of $t s (exit $rc); the output above is what it printed until then."
        summary+=("$id timed out")
        status=1
    else
        verdict="Exit $rc after $took s (limit $t s)."
        summary+=("$id exit $rc")
        [ "$rc" = 0 ] || status=1
    fi
    printf '```\n\n%s\n' "$verdict" >>"$results"
    printf '\n%s\n' "$verdict"
done
printf '\nRan in %d s of %d: %s. Results: %s\n' "$SECONDS" "$budget" "$(IFS=,; echo "${summary[*]}" | sed 's/,/, /g')" \
    "$results"
exit $status
