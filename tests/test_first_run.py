"""The first run, through the real `icedit` console script, against a Hugging Face hub on 127.0.0.1.

Every command runs in a subprocess (huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE at
import) and is judged by its exit code, its exact lines or JSON, and the requests the server received:
which files it sent, and that a cached or offline run sent none. The files a loader reads are worked out
here from the served repos themselves (`selected`), not from assistant.hub's patterns.
"""

from __future__ import annotations

import fnmatch
import json
import pickle
import random
import re
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hub_repos import (
    FLUX,
    MOE_LORA,
    NORMAL_LORA,
    PICKLE_FLUX,
    QWEN_7B,
    ROOT_COPIES,
    qwen_files,
    standard_repos,
)
from hub_server import HubServer, Repo, Request, Snapshot, client_env
from safetensors.torch import load, save

from sessions.identity import png_digest

ICEDIT = Path(sys.executable).with_name("icedit")
CHELSEA = Path(__file__).resolve().parent.parent / "examples" / "chelsea.png"
WINTER = "make it look like winter"
GRANTED = "hf_granted"
LORA = "pytorch_lora_weights.safetensors"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
CLIP, DINO = "openai/clip-vit-base-patch32", "facebook/dino-vits16"  # the eval models `icedit models` lists
BIG = "test/flux-big"
NAMED_MOE = "test/moe-named"  # the MoE adapter under another file name, as repos often keep it
CHUNK = 10 * 2**20  # huggingface_hub writes a download in chunks of this size: a cut file resumes after one
PICKLE_ONLY = (
    "pickle weights only (.bin/.pt/.ckpt): icedit loads .safetensors only, since pickle files can run code"
)
FLUX_GET = (
    f"hf download {FLUX} --include 'model_index.json' --include '*/*.json' --include '*/*.txt' "
    "--include '*/*.model' --include '*/*.safetensors'"
)
LORA_GET = "hf download {} --include '*.safetensors'"
VLM_GET = (
    f"hf download {QWEN_7B} --include '*.json' --include '*.safetensors' --include '*.txt' "
    "--include '*.model' --include '*.jinja'"
)
OPTIONAL = "(optional: without it the rules rewriter runs)"
PIN = "check --{}revision (a commit, tag or branch)"
LOG_IN = "log in (`hf auth login`, or set HF_TOKEN) and accept the licence at {}/" + FLUX


# -------------------------------------------------------------------------------------------------- helpers


def summary(blocked: int, needed: int, offline: bool = False, optional: int = 0) -> str:
    return (
        f"Error: {blocked} of the {needed} model artifacts this command needs"
        f"{f' (and {optional} optional)' if optional else ''} cannot be had now"
        f"{' (offline mode is set: HF_HUB_OFFLINE)' if offline else ''}; `icedit models` shows them all, "
        "`icedit download` fetches them, `--preset tiny` runs offline with random weights:"
    )


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def selected(files: dict[str, bytes], layout: str) -> set[str]:
    """The files a loader reads: a diffusers pipeline's model_index.json and its component folders'
    configs, tokenizer files and safetensors; a transformers model's json/safetensors/txt/model/jinja
    files; an adapter's one file."""
    if layout == "file":
        return {LORA}
    if layout == "transformers":
        return {p for p in files if p.endswith((".json", ".safetensors", ".txt", ".model", ".jinja"))}
    index = json.loads(files["model_index.json"])
    parts = {
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
    }
    return {"model_index.json"} | {
        p
        for p in files
        if "/" in p and p.split("/")[0] in parts and p.endswith((".json", ".txt", ".model", ".safetensors"))
    }


def size(files: dict[str, bytes], names: set[str]) -> int:
    return sum(len(files[n]) for n in names)


class Run(NamedTuple):
    code: int
    stdout: str
    stderr: str
    requests: list[Request]  # what the server received while the command ran
    seconds: float

    @property
    def json(self):
        return json.loads(self.stdout)

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()

    def gets(self, repo_id: str) -> list[str]:
        """The files of `repo_id` it sent (200 or 206), in order, with repeats."""
        prefix = f"/{repo_id}/resolve/"
        return [
            r.path[len(prefix) :].split("/", 1)[1]
            for r in self.requests
            if r.method == "GET" and r.path.startswith(prefix) and r.status in (200, 206)
        ]

    def downloading(self) -> list[str]:
        """What it said it was downloading."""
        return [line for line in self.lines if line.startswith("downloading ")]


def icedit(
    server: HubServer,
    hf_home: Path,
    *args: object,
    token: str | None = None,
    offline: bool = False,
    program: tuple[str, ...] = (str(ICEDIT),),
    **env: str,
) -> Run:
    """Run the console script (or `program`) with this server, this HF_HOME and an own ICEDIT_HOME."""
    assert ICEDIT.is_file(), f"console script missing: {ICEDIT}"
    environment = client_env(server, hf_home, token, offline)
    environment = {k: v for k, v in environment.items() if not k.startswith("ICEDIT_")}
    environment |= {"ICEDIT_HOME": str(hf_home.parent / "icedit-home"), "OMP_NUM_THREADS": "1"} | env
    before, started = len(server.requests), time.monotonic()
    done = subprocess.run(
        [*program, *map(str, args)],
        cwd=hf_home.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    seconds = time.monotonic() - started
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    return Run(done.returncode, done.stdout, done.stderr, server.requests[before:], seconds)


def edit(server: HubServer, hf_home: Path, *args: object, **kw) -> Run:
    out = hf_home.parent / f"edit-{time.monotonic_ns()}.png"
    return icedit(
        server, hf_home, "edit", CHELSEA, WINTER, "--steps", 2, "--seed", 1, "--json", "-o", out, *args, **kw
    )


def blobs(hf_home: Path) -> list[Path]:
    """The files in the Hugging Face cache."""
    return sorted((hf_home / "hub").glob("models--*/blobs/*"))


def snapshot_path(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> str:
    return str(
        hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / Snapshot.of(files).sha
    )


def _eval_model_repo(extra: dict[str, bytes]) -> Repo:
    """An eval model's repo as the real ones are: configs, tokenizer files, safetensors, pickle/TF/Flax twins."""
    weights = save({"w": torch.zeros(4)})
    return Repo(
        {
            "config.json": b'{"model_type": "stand-in"}',
            "model.safetensors": weights,
            "pytorch_model.bin": b"pickle twin",
            "tf_model.h5": b"tf twin",
            "flax_model.msgpack": b"flax twin",
            "preprocessor_config.json": b"{}",
            "README.md": b"# stand-in\n",
        }
        | extra
    )


@pytest.fixture(scope="module")
def repos() -> dict[str, Repo]:
    """The standard repos, the two eval models, and a FLUX-like repo whose transformer weights pass 10 MiB."""
    standard = standard_repos()
    flux = standard[FLUX].files
    noise = bytearray(random.Random(0).randbytes(CHUNK + 2**20))
    big = save({"weight": torch.frombuffer(noise, dtype=torch.uint8)})  # downloaded, never loaded
    return standard | {
        CLIP: _eval_model_repo(
            {
                "merges.txt": b"#version: 0.2\n",
                "vocab.json": b"{}",
                "tokenizer.json": b"{}",
                "tokenizer_config.json": b"{}",
                "special_tokens_map.json": b"{}",
            }
        ),
        DINO: _eval_model_repo({}),
        BIG: Repo({p: flux[p] for p in selected(flux, "diffusers")} | {WEIGHTS: big}),
        NAMED_MOE: Repo(
            {"ICEdit-MoE-LoRA.safetensors": standard[MOE_LORA].files[LORA], "README.md": b"# moe\n"}
        ),
    }


@pytest.fixture(scope="module")
def server(repos):
    with HubServer(repos, {GRANTED}) as started:
        yield started


# -------------------------------------------------------------------------------------------- the first edits


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory) -> tuple[Path, dict[str, Run]]:
    """One HF_HOME, empty at first: the default edit, an MoE edit with the VLM rewriter, the same again offline,
    and an edit at FLUX's branch v2."""
    hf_home = tmp_path_factory.mktemp("first-run") / "hf"
    runs = {"default": edit(server, hf_home, "--preset", "default", "--rewriter", "rules", token=GRANTED)}
    # free text from the VLM: with random weights a constrained plan may well not be an edit, and these runs
    # are about what is downloaded and loaded (constrained decoding: test_grammar.py)
    free = ("--no-vlm-grammar",)
    runs["moe"] = edit(server, hf_home, "--lora", MOE_LORA, *free, token=GRANTED)
    runs["moe offline"] = edit(server, hf_home, "--lora", MOE_LORA, *free, offline=True)
    runs["v2"] = edit(server, hf_home, "--revision", "v2", "--rewriter", "rules", token=GRANTED)
    return hf_home, runs


def test_the_first_edit_downloads_the_gated_pipeline_and_the_lora_once_then_edits(first_run, repos):
    _, runs = first_run
    run = runs["default"]
    assert run.code == 0, run.stderr
    flux, lora = repos[FLUX].files, repos[NORMAL_LORA].files
    wanted = selected(flux, "diffusers")
    assert run.downloading() == [
        f"downloading the FLUX.1 Fill pipeline {FLUX} ({mib(size(flux, wanted))})",
        f"downloading the LoRA {NORMAL_LORA} ({mib(len(lora[LORA]))})",
    ]
    # model_index.json twice: read into memory to plan the download, then fetched into the cache
    assert Counter(run.gets(FLUX)) == Counter(wanted) + Counter(["model_index.json"])
    assert run.gets(NORMAL_LORA) == [LORA] and not [r for r in run.requests if QWEN_7B in r.path]
    assert all(r.authorization == f"Bearer {GRANTED}" for r in run.requests)
    result = run.json
    assert (result["rewriter"], result["random_weights"], result["seed"], result["nfe"]) == (
        "rules",
        False,
        1,
        2,
    )
    assert result["adapter"] == {
        "kind": "lora",
        "source": NORMAL_LORA,
        "keys": len(load(lora[LORA])),
        "num_experts": 0,
        "top_k": None,
        "gate": None,
        "scale": 1.0,
        "revision": Snapshot.of(repos[NORMAL_LORA].files).sha,  # the commit it came from: provenance
    }
    assert png_digest(Path(result["output"]).read_bytes()) == result["image_sha256"]


def test_an_uncached_moe_lora_by_hub_id_loads_as_lora_moe_and_the_vlm_rewrites_by_default(first_run, repos):
    _, runs = first_run
    run = runs["moe"]
    assert run.code == 0, run.stderr
    result = run.json
    moe = repos[MOE_LORA].files[LORA]
    assert result["adapter"] == {
        "kind": "lora-moe",
        "source": MOE_LORA,
        "keys": len(load(moe)),
        "num_experts": 4,
        "top_k": 1,
        "gate": "topk",
        "scale": 1.0,
        "revision": Snapshot.of(repos[MOE_LORA].files).sha,
    }
    # the tiny random VLM may answer with no valid plan: then the rules read the request, and the label says why
    assert re.fullmatch(r"qwen_vl( -> rules \(.+\))?", result["rewriter"]), result["rewriter"]
    qwen = repos[QWEN_7B].files
    vlm = selected(qwen, "transformers")
    assert run.downloading() == [
        f"downloading the LoRA {MOE_LORA} ({mib(len(moe))})",
        f"downloading the VLM {QWEN_7B} ({mib(size(qwen, vlm))})",
    ]
    assert not [line for line in run.lines if "cannot run" in line]
    assert (f"note: rewriter {result['rewriter']}" in run.lines) == (" -> " in result["rewriter"])
    assert run.gets(MOE_LORA) == [LORA] and sorted(run.gets(QWEN_7B)) == sorted(vlm)
    assert not [r for r in run.requests if FLUX in r.path or NORMAL_LORA in r.path]  # cached: not even asked


def test_the_first_runs_fetch_no_root_level_copy_readme_licence_or_pickle_file(first_run):
    _, runs = first_run
    fetched = [r.path for run in runs.values() for r in run.requests if "/resolve/" in r.path]
    assert fetched and not [
        p for p in fetched if p.endswith((*ROOT_COPIES, "README.md", "LICENSE.md", ".bin"))
    ]


def test_the_same_edit_again_offline_runs_from_the_cache_without_a_request(first_run):
    _, runs = first_run
    online, offline = runs["moe"], runs["moe offline"]
    assert offline.code == 0, offline.stderr
    assert offline.requests == []
    assert offline.downloading() == []
    assert [offline.json[k] for k in ("image_sha256", "rewriter", "adapter")] == [
        online.json[k] for k in ("image_sha256", "rewriter", "adapter")
    ]


def test_a_real_branch_downloads_only_the_file_that_differs_and_edits_with_it(first_run, repos):
    hf_home, runs = first_run
    run = runs["v2"]
    assert run.code == 0, run.stderr
    assert run.gets(FLUX) == ["model_index.json", WEIGHTS]  # the plan, then the one blob v2 does not share
    v2 = repos[FLUX].revisions["v2"]
    assert run.downloading() == [
        f"downloading the FLUX.1 Fill pipeline {FLUX}@v2 ({mib(size(v2, selected(v2, 'diffusers')))})"
    ]
    assert (
        hf_home / "hub" / "models--black-forest-labs--FLUX.1-Fill-dev" / "refs" / "v2"
    ).read_text() == Snapshot.of(v2).sha
    assert (
        run.json["image_sha256"] != runs["default"].json["image_sha256"]
    )  # v2's x_embedder.bias is all ones
    assert run.json["adapter"]["kind"] == "lora"


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("token", "line"),
    [
        (None, f"401: gated repo and not logged in; {LOG_IN}"),
        (
            "hf_other",
            "403: the licence is not accepted for this account; accept it at {}/"
            + FLUX
            + " (logged in as the account whose token icedit uses)",
        ),
    ],
    ids=["no token", "not granted"],
)
def test_a_gated_repo_without_access_says_how_to_get_it_and_downloads_nothing(server, tmp_path, token, line):
    hf_home = tmp_path / "hf"
    run = edit(server, hf_home, "--lora", "none", "--rewriter", "rules", token=token)
    assert run.code == 2 and run.stdout == ""
    assert run.lines == [f"Error: FLUX.1 Fill pipeline '{FLUX}' (--model): {line.format(server.endpoint)}"]
    assert blobs(hf_home) == [] and not [
        r for r in run.requests if r.method == "GET" and r.status == 200 and "/resolve/" in r.path
    ]


def test_a_missing_revision_is_named_with_the_flag_that_pins_it(server, tmp_path):
    run = edit(
        server,
        tmp_path / "hf",
        "--revision",
        "nope",
        "--lora-revision",
        "nope",
        "--rewriter",
        "rules",
        token=GRANTED,
    )
    assert run.code == 2
    assert run.lines == [
        summary(2, 2),
        f"  FLUX.1 Fill pipeline '{FLUX}@nope' (--model): no revision 'nope' in the repo; {PIN.format('')}",
        f"  LoRA '{NORMAL_LORA}@nope' (--lora): no revision 'nope' in the repo; {PIN.format('lora-')}",
    ]
    assert blobs(tmp_path / "hf") == []


def test_offline_mode_with_an_empty_cache_stops_at_once_listing_every_artifact(server, tmp_path):
    run = edit(server, tmp_path / "hf", offline=True)
    assert run.code == 2 and run.requests == []
    fix = "unset HF_HUB_OFFLINE to download it, or fetch it elsewhere with `{}`"
    missing = "not in the Hugging Face cache and offline mode is set (HF_HUB_OFFLINE)"
    assert run.lines == [
        summary(2, 3, offline=True, optional=1),
        f"  FLUX.1 Fill pipeline '{FLUX}' (--model): {missing}; {fix.format(FLUX_GET)}",
        f"  LoRA '{NORMAL_LORA}' (--lora): {missing}; {fix.format(LORA_GET.format(NORMAL_LORA))}",
        f"  VLM '{QWEN_7B}' (--vlm): {missing}; {fix.format(VLM_GET)} {OPTIONAL}",
    ]


def test_several_missing_artifacts_are_one_report_each_with_its_own_reason(server, tmp_path):
    run = edit(server, tmp_path / "hf", "--lora", "nobody/none")  # no token: FLUX is gated; the VLM is served
    assert run.code == 2
    gated = f"401: gated repo and not logged in; {LOG_IN.format(server.endpoint)}"
    unknown = "no such repo on the hub; check --lora (a private repo also needs `hf auth login`)"
    assert run.lines == [
        summary(2, 3),
        f"  FLUX.1 Fill pipeline '{FLUX}' (--model): {gated}",
        f"  LoRA 'nobody/none' (--lora): {unknown}",
    ]
    assert (
        run.gets(QWEN_7B) == [] and blobs(tmp_path / "hf") == []
    )  # nothing fetched while something is missing


def test_an_unreachable_hub_is_one_line_and_no_retries(server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = edit(server, tmp_path / "hf", "--lora", "none", "--rewriter", "rules", HF_ENDPOINT=closed)
    assert run.code == 2 and len(run.lines) == 1, run.stderr
    head, _, tail = run.lines[0].partition(" cannot be reached (")
    assert head == f"Error: FLUX.1 Fill pipeline '{FLUX}' (--model): the hub at {closed}"
    assert tail.endswith(f"); check the network or proxy (HTTPS_PROXY), or download it elsewhere: {FLUX_GET}")
    assert run.seconds < 15  # huggingface_hub's file retries would take 23 s


def _canary(marker: Path) -> bytes:
    """A pickle that, once unpickled, creates `marker`."""

    class Canary:
        def __reduce__(self):
            import os

            return os.mkdir, (str(marker),)

    return pickle.dumps(Canary())


def test_a_pickle_only_repo_is_refused_without_fetching_its_pickles(server, tmp_path):
    run = edit(server, tmp_path / "hf", "--model", PICKLE_FLUX, "--lora", "none", "--rewriter", "rules")
    assert run.code == 2
    assert run.lines == [f"Error: FLUX.1 Fill pipeline '{PICKLE_FLUX}' (--model): {PICKLE_ONLY}"]
    assert run.gets(PICKLE_FLUX) == ["model_index.json"] and blobs(tmp_path / "hf") == []  # no .bin came


@pytest.mark.parametrize("kind", ["pipeline", "vlm"])
def test_a_local_folder_with_only_pickle_weights_is_refused_unopened(server, tmp_path, kind):
    marker = tmp_path / "unpickled"
    folder = tmp_path / kind
    if kind == "pipeline":
        files = standard_repos()[PICKLE_FLUX].files
    else:
        files = {("pytorch_model.bin" if n == "model.safetensors" else n): d for n, d in qwen_files().items()}
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_canary(marker) if name.endswith(".bin") else data)
    if kind == "pipeline":
        run = edit(server, tmp_path / "hf", "--model", folder, "--lora", "none", "--rewriter", "rules")
        assert run.code == 2 and len(run.lines) == 1, run.stderr
        part = re.fullmatch(
            rf"Error: FLUX\.1 Fill pipeline '{re.escape(str(folder))}' \(--model\): (\w+)/: "
            + re.escape(PICKLE_ONLY),
            run.lines[0],
        )
        assert part and list((folder / part[1]).glob("*.bin")), run.lines
    else:
        run = icedit(
            server, tmp_path / "hf", "rewrite", CHELSEA, WINTER, "--rewriter", "qwen_vl", "--vlm", folder
        )
        assert run.code == 2
        assert run.lines == [f"Error: VLM '{folder}' (--vlm): {PICKLE_ONLY}"]
    assert run.requests == [] and not marker.exists()


# ------------------------------------------------------------------------------------------ models, download


@pytest.fixture(scope="module")
def listing(server, tmp_path_factory) -> tuple[Path, dict[str, Run], list[Path]]:
    """One HF_HOME: `icedit models` with and without a token, `icedit download --with-vlm`, `icedit models` again;
    and the blobs the two listings left in the cache."""
    hf_home = tmp_path_factory.mktemp("listing") / "hf"
    runs = {
        "before": icedit(server, hf_home, "models", "--json", token=GRANTED),
        "no token": icedit(server, hf_home, "models"),
    }
    left = blobs(hf_home)
    runs["download"] = icedit(server, hf_home, "download", "--with-vlm", "--json", token=GRANTED)
    runs["after"] = icedit(server, hf_home, "models", "--json", token=GRANTED)
    return hf_home, runs, left


ROWS = [
    (["edit"], "FLUX.1 Fill pipeline", FLUX, "--model", "diffusers"),
    (["edit"], "LoRA", NORMAL_LORA, "--lora", "file"),
    (["rewriter", "early filter"], "VLM", QWEN_7B, "--vlm", "transformers"),
    (["eval"], "CLIP model", CLIP, "--clip-model", "transformers"),
    (["eval"], "DINO model", DINO, "--dino-model", "transformers"),
]


def test_models_lists_every_artifact_with_the_exact_bytes_to_download_and_writes_nothing(listing, repos):
    hf_home, runs, left = listing
    run = runs["before"]
    assert run.code == 0 and run.stderr == ""
    report = run.json
    assert (report["cache"], report["offline_mode"]) == (str(hf_home / "hub"), False)
    assert [[row[k] for k in ("for", "role", "ref", "option")] for row in report["artifacts"]] == [
        list(r[:4]) for r in ROWS
    ]
    for row, (_, _, ref, _, layout) in zip(report["artifacts"], ROWS, strict=True):
        files = repos[ref].files
        wanted = selected(files, layout)
        assert {
            k: row[k]
            for k in (
                "revision",
                "path",
                "cached",
                "commit",
                "size_on_disk",
                "to_download",
                "gated",
                "access",
                "problem",
                "fix",
            )
        } == {
            "revision": None,
            "path": None,
            "cached": False,
            "commit": Snapshot.of(files).sha,
            "size_on_disk": 0,
            "to_download": size(files, wanted),
            "gated": ref == FLUX,
            "access": True,
            "problem": None,
            "fix": None,
        }, ref
        # the command a person copies to another machine fetches the same files
        words = shlex.split(row["download_command"])
        assert words[:3] == ["hf", "download", ref] and words[3::2] == ["--include"] * len(words[4::2])
        assert {p for p in files if any(fnmatch.fnmatch(p, pattern) for pattern in words[4::2])} == wanted, (
            ref
        )
    assert left == []  # listing fetched nothing into the cache
    assert not [
        r
        for r in run.requests
        if r.method == "GET" and "/resolve/" in r.path and not r.path.endswith("/model_index.json")
    ]


def test_models_without_a_token_names_the_cache_and_says_the_gated_repo_has_no_access(listing, repos, server):
    hf_home, runs, _ = listing
    run = runs["no token"]
    assert run.code == 0 and run.stderr == ""
    lines = run.stdout.splitlines()
    flux_sha = Snapshot.of(repos[FLUX].files).sha[:12]
    assert lines[0] == f"Hugging Face cache: {hf_home / 'hub'} (HF_HUB_OFFLINE not set)"
    assert lines[1:3] == [
        f"FLUX.1 Fill pipeline (edit): {FLUX}: missing, 0.0 MiB on disk, revision {flux_sha}, gated, no access",
        f"  401: gated repo and not logged in; {LOG_IN.format(server.endpoint)}",
    ]
    lora = repos[NORMAL_LORA].files
    assert (
        f"LoRA (edit): {NORMAL_LORA}: missing, 0.0 MiB on disk, revision {Snapshot.of(lora).sha[:12]}, "
        f"{mib(len(lora[LORA]))} to download"
    ) in lines


def test_download_fetches_exactly_the_files_the_loaders_read_and_models_then_says_cached(listing, repos):
    hf_home, runs, _ = listing
    run, after = runs["download"], runs["after"]
    assert run.code == 0, run.stderr
    assert after.code == 0 and after.stderr == ""
    for _, _, ref, _, layout in ROWS[:3]:
        wanted = selected(repos[ref].files, layout)
        planned = Counter(["model_index.json"] if layout == "diffusers" else [])  # read to plan, then fetched
        assert Counter(run.gets(ref)) == Counter(wanted) + planned, ref
    assert not [r for r in run.requests if CLIP in r.path or DINO in r.path]  # not without --with-eval-models
    downloaded = {row["ref"]: row for row in run.json["artifacts"]}  # answered from disk
    assert list(downloaded) == [FLUX, NORMAL_LORA, QWEN_7B]
    for row, (_, _, ref, _, layout) in zip(after.json["artifacts"], ROWS, strict=True):
        files = repos[ref].files
        wanted = selected(files, layout)
        if ref in (CLIP, DINO):
            assert (row["cached"], row["size_on_disk"], row["to_download"]) == (False, 0, size(files, wanted))
            continue
        on_disk = {
            "path": snapshot_path(hf_home, ref, files),
            "cached": True,
            "commit": Snapshot.of(files).sha,
            "size_on_disk": size(files, wanted),
            "to_download": 0,
            "problem": None,
        }
        assert {k: row[k] for k in on_disk} == on_disk, ref
        assert row["access"] is True
        assert {k: downloaded[ref][k] for k in on_disk} == on_disk, ref
    assert not [
        r
        for r in after.requests
        if r.method == "GET" and "/resolve/" in r.path and not r.path.endswith("/model_index.json")
    ]


def test_an_interrupted_download_resumes_where_it_stopped(server, repos, tmp_path):
    hf_home = tmp_path / "hf"
    server.fail_once(BIG, WEIGHTS, after_bytes=CHUNK + 5000)
    run = icedit(server, hf_home, "download", "--model", BIG, "--lora", "none", "--json")
    assert run.code == 0, run.stderr
    big = repos[BIG].files
    assert [(r.range, r.status) for r in run.requests if r.method == "GET" and r.path.endswith(WEIGHTS)] == [
        (None, 200),
        (f"bytes={CHUNK}-", 206),
    ]
    (row,) = run.json["artifacts"]
    assert (row["cached"], row["size_on_disk"]) == (True, size(big, selected(big, "diffusers")))
    assert (Path(row["path"]) / WEIGHTS).read_bytes() == big[WEIGHTS]


# the console script's entry point, with the free space of every disk reported as {free} bytes
DISK_FULL = """
import shutil, sys
real = shutil.disk_usage
shutil.disk_usage = lambda path: real(path)._replace(free={free})
from assistant.cli import main
sys.argv = ["icedit", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("short", ["the pipeline", "the pipeline and the lora together"])
def test_too_little_free_space_is_reported_before_any_weight_is_fetched(server, repos, tmp_path, short):
    hf_home = tmp_path / "hf"
    (hf_home / "hub").mkdir(parents=True)
    flux = size(repos[FLUX].files, selected(repos[FLUX].files, "diffusers"))
    lora = len(repos[NORMAL_LORA].files[LORA])
    free = flux - 1 if short == "the pipeline" else flux
    program = (sys.executable, "-c", DISK_FULL.format(free=free))
    run = icedit(server, hf_home, "download", "--json", token=GRANTED, program=program)
    assert run.code == 2 and run.stdout == ""
    if short == "the pipeline":
        line = (
            f"Error: FLUX.1 Fill pipeline '{FLUX}' (--model): no space left: {mib(flux)} to download, "
            f"{mib(free)} free on {hf_home / 'hub'}; free some space, or point HF_HOME (or HF_HUB_CACHE) at a "
            "bigger disk"
        )
    else:
        line = (
            f"Error: no space left for the download: {mib(flux + lora)} to fetch ({FLUX}, {NORMAL_LORA}), "
            f"{mib(free)} free on {hf_home / 'hub'}; free some space or point HF_HOME at a bigger disk"
        )
    assert run.lines == [line]
    assert run.gets(FLUX) == ["model_index.json"] and run.gets(NORMAL_LORA) == []  # read to plan; no weights
    assert blobs(hf_home) == []


def test_an_adapter_repo_whose_one_safetensors_has_another_name_is_found_fetched_and_loaded(server, tmp_path):
    run = edit(server, tmp_path / "hf", "--preset", "tiny", "--lora", NAMED_MOE)
    assert run.code == 0, run.stderr
    assert run.gets(NAMED_MOE) == ["ICEdit-MoE-LoRA.safetensors"]
    adapter = run.json["adapter"]
    assert (adapter["kind"], adapter["num_experts"]) == ("lora-moe", 4)


def test_the_printed_hf_download_command_fetches_what_icedit_loads(server, repos, tmp_path):
    """A person on another machine runs the command the report prints; icedit then finds it complete."""
    listed = icedit(server, tmp_path / "hf", "models", "--json", token=GRANTED)
    rows = {row["ref"]: row for row in listed.json["artifacts"]}
    for repo_id in (FLUX, QWEN_7B):
        hf = Path(sys.executable).with_name("hf")
        fetched = icedit(
            server,
            tmp_path / "hf",
            *shlex.split(rows[repo_id]["download_command"])[2:],
            token=GRANTED,
            program=(str(hf), "download"),
        )
        assert fetched.code == 0, fetched.stderr
        layout = "diffusers" if repo_id == FLUX else "transformers"
        assert set(fetched.gets(repo_id)) == selected(repos[repo_id].files, layout)
    after = icedit(server, tmp_path / "hf", "models", "--json", token=GRANTED).json["artifacts"]
    assert {row["ref"]: row["cached"] for row in after if row["ref"] in (FLUX, QWEN_7B)} == {
        FLUX: True,
        QWEN_7B: True,
    }
