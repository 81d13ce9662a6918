#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels an offline GPU machine lacks: cp312, manylinux
# x86_64 or pure Python, into benchmarks/gpu/wheels/ (git-ignored), for run.sh to install there.
# Run it with the project's venv active: a package that constraints.txt does not pin is taken at the
# version this environment has, the stack the CPU figures in RESULTS.md ran on.
#
#     . .venv/bin/activate && bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=benchmarks/gpu/wheels
python=${PYTHON:-python}

# What run.sh asks the GPU machine's pip for: our code and tests import these, and the device lacks
# them. Those that constraints.txt pins are installed at that pin; for the others a copy the device
# already has stays when it satisfies pyproject.toml and every other requirement.
top=(diffusers torchao pluggy textual textual-image pydantic pydantic-settings platformdirs click dill
     llguidance pytest pytest-asyncio hypothesis)
# Installed without its dependencies: qwen-vl-utils requires av (30 MB) for video, our image path needs PIL only.
no_deps=(qwen-vl-utils)
# Their dependencies that a machine with torch, transformers and peft may lack. Every download below
# is --no-deps, so nothing drags in torch, triton or nvidia-*; the check at the end names any
# dependency that is neither in the kit nor in its DEVICE list.
deps=(pydantic-core annotated-types typing-inspection typing-extensions python-dotenv importlib-metadata zipp
      lazy-importer rich markdown-it-py mdurl mdit-py-plugins linkify-it-py pygments iniconfig packaging
      sortedcontainers)

mkdir -p "$dest"
rm -f "$dest"/*.whl "$dest"/requirements*.txt
# Prints the pins to download, and writes what run.sh installs: requirements.txt (constraints.txt's
# pin, else pyproject.toml's requirement, else the bare name) and requirements-no-deps.txt.
pins=$("$python" - "$dest" "${#top[@]}" "${#no_deps[@]}" "${top[@]}" "${no_deps[@]}" "${deps[@]}" <<'EOF'
import importlib.metadata as md
import pathlib
import re
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dest, n_top, n_no_deps, names = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
constraints = {}
for line in open("constraints.txt"):
    if m := re.match(r"\s*([A-Za-z0-9_.-]+)==(\S+)", line):
        constraints[canonicalize_name(m[1])] = m[2]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
required = {canonicalize_name(r.name): str(r) for r in map(Requirement, [
    *project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)])}
specs = []
for name in names:
    if re.fullmatch(r"torch|torchvision|torchaudio|triton|nvidia-.*", name):
        sys.exit(f"fetch_wheels.sh: {name} is the GPU machine's own; it never goes in the kit")
    try:
        version = constraints.get(name) or md.version(name)
    except md.PackageNotFoundError:
        sys.exit(f"fetch_wheels.sh: {name} is neither pinned in constraints.txt nor installed here; "
                 "activate the project's venv (. .venv/bin/activate)")
    print(f"{name}=={version}")
    specs.append(f"{name}=={version}" if name in constraints else required.get(name, name))
(dest / "requirements.txt").write_text("".join(f"{s}\n" for s in specs[:n_top]))
(dest / "requirements-no-deps.txt").write_text("".join(f"{s}\n" for s in specs[n_top:n_top + n_no_deps]))
EOF
)

log=$(mktemp)
# shellcheck disable=SC2086  # one pin per word
# manylinux_2_31 too: llguidance ships only for glibc 2.31 and newer (any current CUDA image has it)
if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 \
        --dest "$dest" $pins >"$log" 2>&1; then
    grep -v "is neither a file nor a directory" "$log" >&2  # this machine's pip config names local indexes
    rm -f "$log"
    exit 1
fi
rm -f "$log"

# One wheel per pin, every dependency in the kit or on the device, and the folder well under the
# device tool's 64 MiB for everything it carries.
# shellcheck disable=SC2086
"$python" - "$dest" $pins <<'EOF'
import pathlib
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

DEVICE = {"torch", "transformers", "peft", "accelerate", "safetensors", "huggingface-hub", "numpy", "pillow",
          "requests", "filelock", "regex"}
dest, pins = pathlib.Path(sys.argv[1]), sys.argv[2:]
wheels = {}
for whl in sorted(dest.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(whl.name)
    wheels[name] = (version, whl)
missing = [p for p in pins if canonicalize_name(p.split("==")[0]) not in wheels]
if missing or len(wheels) != len(pins):
    sys.exit(f"fetch_wheels.sh: expected one wheel per pin; missing: {', '.join(missing) or 'none'}, "
             f"{len(wheels)} wheels for {len(pins)} pins")
env = default_environment() | {
    "python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
}
no_deps = {canonicalize_name(line.split("==")[0]) for line in open(dest / "requirements-no-deps.txt")}
unmet = []
for name, (version, whl) in wheels.items():
    if name in no_deps:
        continue
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker and not req.marker.evaluate(env | {"extra": ""}):
            continue
        dep = canonicalize_name(req.name)
        if dep in wheels:
            if not req.specifier.contains(wheels[dep][0], prereleases=True):
                unmet.append(f"{name} needs {req}, the kit has {wheels[dep][0]}")
        elif dep not in DEVICE:
            unmet.append(f"{name} needs {req}: neither in the kit nor assumed on the device")
if unmet:
    sys.exit("fetch_wheels.sh: " + "; ".join(unmet))
total = sum(whl.stat().st_size for _, whl in wheels.values())
for name, (version, whl) in wheels.items():
    print(f"{whl.stat().st_size / 2**20:7.2f} MiB  {whl.name}")
print(f"{total / 2**20:7.2f} MiB  in {len(wheels)} wheels, {dest}/")
if total > 32 * 2**20:
    sys.exit("fetch_wheels.sh: over 32 MiB; the device tool carries 64 MiB in all, the working tree included")
EOF
