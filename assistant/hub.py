"""Model weights a command needs: where they are, whether they are complete, and how to get them.

Plugins name their weights as `Artifact`s (a hub id or a local path, its layout, the flag that
sets it). Before any weights load, the host checks all of them at once (`preflight`): cached and
complete, or downloadable now; every one that is not is reported together, each with its real
reason (offline mode, no network, 401, 403, no such repo or revision, no space) and its fix. Then
the missing ones are fetched (exactly the files the loaders read, `patterns`), and the loaders
read them from disk (`locate`), so nothing is fetched half-way through an edit.

Everything goes through huggingface_hub's own client: its endpoint (`HF_ENDPOINT`), proxies,
token, offline switch (`HF_HUB_OFFLINE`) and typed errors. A cached, complete artifact costs no
request at all. Weights are read from safetensors only: a folder or repo holding only pickle files
is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from assistant.errors import UserError, WeightsMissing
from assistant.files import SAID, kind

Layout = Literal["diffusers", "transformers", "file"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_ONLY = (
    "pickle weights only (.bin/.pt/.ckpt): icedit loads .safetensors only, since pickle files can run code"
)
TRANSFORMERS_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
COMPONENT_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class Artifact(BaseModel):
    """One set of weights a command needs, as a plugin names it."""

    role: str = Field(description='what it is, for messages: "FLUX.1 Fill pipeline", "LoRA", "VLM"')
    ref: str = Field(description="hub id (owner/name) or local path")
    revision: str | None = Field(None, description="hub commit, tag or branch (None: main)")
    layout: Layout = Field(description="diffusers pipeline folder, transformers model folder, or one file")
    filename: str | None = Field(None, description="layout 'file': the file's name in the repo or folder")
    guess_filename: bool = Field(
        False,
        description="layout 'file': when `filename` is not there, take the only "
        ".safetensors file (diffusers' own rule for adapters)",
    )
    option: str = Field(description="the flag that chooses it, for fixes: --model, --lora, --vlm")
    adapter: bool = Field(
        False, description="weights added to a base model (a LoRA), not a model of their own"
    )
    required: bool = Field(True, description="False: the command runs without it (`fallback` instead)")
    fallback: str | None = Field(None, description="what runs when an optional artifact is missing")

    @property
    def local(self) -> bool:
        return is_local(self.ref)

    @property
    def name(self) -> str:
        return at_revision(self.ref, self.revision)


class ArtifactStatus(BaseModel):
    """Where an artifact stands on this machine, and what it takes to get it."""

    artifact: Artifact
    path: str | None = Field(None, description="the folder or file on disk, when it is there")
    cached: bool = Field(False, description="on disk and complete: loads without the network")
    commit: str | None = None
    size_on_disk: int = 0
    to_download: int | None = Field(None, description="bytes still to fetch (None: not known offline)")
    files: list[str] = Field([], description="the repo's files a download fetches (from the hub's listing)")
    gated: bool | None = None
    access: bool | None = Field(None, description="whether this account may download it (gated repos)")
    problem: str | None = Field(None, description="why it can neither load now nor be downloaded now")
    fix: str | None = None
    download_command: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        """One line for a report: role, reference, reason and fix."""
        a = self.artifact
        text = f"{a.role} '{a.name}' ({a.option}): {self.problem}"
        if self.fix:
            text += f"; {self.fix}"
        if not a.required and a.fallback:
            text += f" (optional: without it {a.fallback} runs)"
        return text


# ---------------------------------------------------------------------------------------------- references


def is_local(ref: str) -> bool:
    """A path (it exists, or is spelt like one) rather than a hub repo id."""
    return ref.startswith((".", "/", "~")) or Path(ref).exists()


def check_repo_id(ref: str, what: str) -> None:
    """A one-line error for a reference that is neither a local path nor a valid hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise UserError(f"the {what} '{ref}' is neither a local path nor a hub id (owner/name)") from None


def at_revision(ref: str, revision: str | None) -> str:
    """How messages name a hub reference: 'owner/name' or 'owner/name@revision'."""
    return ref if revision is None else f"{ref}@{revision}"


def cache_folder() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (the person's choice, not a network failure), as huggingface_hub read it at import
    or as the environment says now."""
    import os

    from huggingface_hub import constants

    return (
        bool(constants.HF_HUB_OFFLINE)
        or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    )


def reachable(timeout: float = 5.0) -> bool:
    """Whether the hub answers at all, asked through huggingface_hub's own HTTP client (proxies, HF_ENDPOINT)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if offline_mode():
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - any transport failure means "not now"
        return False
    return True


# ---------------------------------------------------------------------------------------------- what is needed


def patterns(artifact: Artifact, model_index: dict | None = None) -> list[str]:
    """The files a loader reads, as huggingface_hub allow-patterns.

    A diffusers pipeline needs `model_index.json` and, in each component folder it names, the
    configs, tokenizer files and safetensors weights: never the single-file checkpoints some repos
    keep at their root (FLUX.1 Fill dev's ComfyUI copies: 24 GB more) nor pickle weights. Without
    the index yet, every component folder's files of those kinds.
    """
    if artifact.layout == "file":
        return ["*.safetensors"] if artifact.guess_filename else [artifact.filename or ""]
    if artifact.layout == "transformers":
        return list(TRANSFORMERS_PATTERNS)
    folders = sorted(components(model_index)) if model_index is not None else ["*"]
    return ["model_index.json", *(f"{folder}/{p}" for folder in folders for p in COMPONENT_PATTERNS)]


def components(model_index: dict) -> list[str]:
    """The component folders a model_index.json names (entries set to None left out)."""
    return [
        k
        for k, v in model_index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None
    ]


def _wanted(names: Iterable[str], allow: list[str]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return sorted(filter_repo_objects(list(names), allow_patterns=allow))


def _named(artifact: Artifact, names: Iterable[str]) -> Artifact:
    """`artifact` with its file settled among `names` (a folder's or a repo's files): its own name when
    there, else (guess_filename) the only .safetensors at the top; unchanged when neither."""
    if artifact.layout != "file" or not artifact.guess_filename:
        return artifact
    names = list(names)
    if artifact.filename not in names:
        found = [n for n in names if n.endswith(".safetensors") and "/" not in n]
        if len(found) != 1:
            return artifact
        return artifact.model_copy(update={"filename": found[0], "guess_filename": False})
    return artifact.model_copy(update={"guess_filename": False})


# ---------------------------------------------------------------------------------------------- on disk


def _weights_problem(folder: Path) -> str | None:
    """None when `folder` holds complete safetensors weights; else what is wrong."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            shards = set(json.loads(index[0].read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            return f"{index[0].name} is not a safetensors index"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        return (
            f"incomplete: {len(missing)} of {len(shards)} weight files missing ({missing[0]}, ...)"
            if missing
            else None
        )
    if any(p.is_file() for p in folder.glob("*.safetensors")):
        return None
    if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        return PICKLE_ONLY
    return "no weights in it"


def folder_problem(artifact: Artifact, folder: Path) -> str | None:
    """None when `folder` (a local folder, or a cached snapshot) has everything `artifact` needs."""
    if artifact.layout == "file":
        file = folder / (artifact.filename or "")
        if file.is_file():
            return None if file.suffix == ".safetensors" else PICKLE_ONLY
        return (
            PICKLE_ONLY
            if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir())
            else f"no {artifact.filename} in it"
        )
    if artifact.layout == "transformers":
        if not (folder / "config.json").is_file():
            return "no config.json in it"
        return _weights_problem(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        return "no model_index.json in it (not a diffusers pipeline folder)"
    try:
        parts = components(json.loads(index.read_text()))
    except (OSError, ValueError, AttributeError):
        return "its model_index.json is not valid JSON"
    for name in parts:
        part = folder / name
        if not part.is_dir() or not any(p.is_file() for p in part.iterdir()):
            return f"incomplete: no {name}/ folder"
        if (part / "config.json").is_file() and (problem := _weights_problem(part)):
            return f"{name}/: {problem}"
    return None


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _repo_root(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_folder() / repo_folder_name(repo_id=repo_id, repo_type="model")


def _snapshot(artifact: Artifact) -> tuple[Path | None, str | None]:
    """The cached snapshot folder of a hub artifact at its revision, and its commit (either may be None)."""
    root = _repo_root(artifact.ref)
    revision = artifact.revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else None
    ref_file = root / "refs" / revision
    if commit is None and ref_file.is_file():
        commit = ref_file.read_text().strip()
    folder = root / "snapshots" / commit if commit else None
    return (folder if folder is not None and folder.is_dir() else None), commit


def commit(artifact: Artifact) -> str | None:
    """The commit a hub artifact's revision names in the cache (None for a local path, or not cached)."""
    return None if artifact.local else _snapshot(artifact)[1]


# ---------------------------------------------------------------------------------------------- checking


def status(artifact: Artifact, remote: bool = False) -> ArtifactStatus:
    """Where `artifact` stands. Local paths and complete cached repos are answered from disk alone;
    a hub artifact that is not complete (or any, with `remote`) is looked up on the hub too."""
    found = _disk_status(artifact)
    if artifact.local or (found.cached and not remote):
        return found
    return _remote_status(found, Path(found.path) if found.path else None)


def _disk_status(artifact: Artifact) -> ArtifactStatus:
    """What the disk alone says: a local path's problem, or how much of a hub artifact is cached."""
    found = ArtifactStatus(artifact=artifact, download_command=download_command(artifact))
    if artifact.local:
        return _local_status(found)
    check_repo_id(artifact.ref, artifact.role)
    folder, found.commit = _snapshot(artifact)
    if folder is not None:
        found.artifact = _named(artifact, (p.name for p in folder.iterdir()))
        found.path, found.size_on_disk = str(folder), _size(folder)
        found.cached = folder_problem(found.artifact, folder) is None
    if found.cached:
        found.to_download = 0
    return found


def _local_status(found: ArtifactStatus) -> ArtifactStatus:
    a = found.artifact
    path = Path(a.ref).expanduser()
    found.download_command = None
    what = kind(path)
    if what == "missing":
        found.problem, found.fix = (
            "no such file or folder",
            f"check the path, or give {a.option} a hub id (owner/name)",
        )
        return found
    if what not in ("file", "folder"):
        found.problem = SAID[what]
        return found
    found.path = str(path)
    if path.is_file():
        found.size_on_disk = path.stat().st_size
        if a.layout != "file":
            found.problem = "is a file, not a model folder"
        elif path.suffix != ".safetensors":
            found.problem = PICKLE_ONLY
    else:
        found.artifact = a = _named(a, (p.name for p in path.iterdir()))
        found.size_on_disk = _size(path)
        found.problem = folder_problem(a, path)
    found.cached = found.problem is None
    return found


def _remote_status(found: ArtifactStatus, folder: Path | None) -> ArtifactStatus:
    """Fill in what the hub says: commit, gating, access, bytes to fetch, free space; or why it can't."""
    from huggingface_hub import HfApi

    a = found.artifact
    if offline_mode():
        if not found.cached:
            found.problem = (
                "not in the Hugging Face cache" if folder is None else "only partly in the Hugging Face cache"
            ) + " and offline mode is set (HF_HUB_OFFLINE)"
            found.fix = (
                f"unset HF_HUB_OFFLINE to download it, or fetch it elsewhere with `{found.download_command}`"
            )
        return found
    try:
        info = HfApi().model_info(a.ref, revision=a.revision, files_metadata=True)
        found.commit, found.gated = info.sha, bool(info.gated)
        names = [s.rfilename for s in info.siblings or []]
        if a.layout == "diffusers" and "model_index.json" not in names:
            found.problem = "not a diffusers pipeline repo (no model_index.json in it)"
            found.fix = f"give {a.option} a FLUX.1 Fill pipeline in the diffusers layout"
            return found
        found.artifact = a = _named(a, names)
        model_index = _read_model_index(a, info.sha) if a.layout == "diffusers" else None
        found.files = wanted = _wanted(names, patterns(a, model_index))
        if not wanted:
            found.problem = (
                f"the repo has none of the files icedit loads ({', '.join(patterns(a, model_index))})"
            )
            if a.layout == "file":
                others = sorted(
                    s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".safetensors")
                )
                found.fix = (
                    f"name its file with --{a.option.strip('-')}-weight-name (it has: {', '.join(others)})"
                    if others
                    else "it holds no .safetensors adapter"
                )
            return found
        _check_access(a, wanted[0])
        found.access = True
    except Exception as e:  # noqa: BLE001 - huggingface_hub's typed errors, mapped in _why
        found.problem, found.fix = _why(e, a)
        if found.gated and found.problem.startswith(("401", "403")):
            found.access = False
        return found
    if a.layout == "file" and a.guess_filename:  # several .safetensors, none of the default name
        found.problem = f"the repo has no {a.filename} and several other .safetensors files"
        found.fix = f"name one with {a.option}-weight-name ({', '.join(wanted)})"
        return found
    if a.layout != "file" and not any(n.endswith(".safetensors") for n in wanted):
        found.problem = PICKLE_ONLY
        return found
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    have = _repo_root(a.ref) / "snapshots" / (info.sha or "")
    found.to_download = sum(sizes[n] for n in wanted if not (have / n).is_file())
    free = shutil.disk_usage(_existing(cache_folder())).free
    if found.to_download > free:
        found.problem = (
            f"no space left: {gib(found.to_download)} to download, {gib(free)} free on "
            f"{_existing(cache_folder())}"
        )
        found.fix = "free some space, or point HF_HOME (or HF_HUB_CACHE) at a bigger disk"
    return found


def _read_model_index(artifact: Artifact, commit: str | None) -> dict:
    """The pipeline's model_index.json, read from the hub into memory: a status writes nothing to the
    cache, so `to_download` counts every file a download will fetch, on every call."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(artifact.ref, "model_index.json", revision=commit or artifact.revision)
    response = get_session().get(url, headers=build_hf_headers(), timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
    hf_raise_for_status(response)
    return json.loads(response.content)


def _check_access(artifact: Artifact, filename: str) -> None:
    """A HEAD of one file: raises GatedRepoError (401 or 403) when this account may not download it."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(artifact.ref, filename, revision=artifact.revision))


def _why(error: Exception, artifact: Artifact) -> tuple[str, str | None]:
    """(reason, fix) for a failed hub look-up, from huggingface_hub's typed errors."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"{constants.ENDPOINT}/{artifact.ref}"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        if status == 403:
            return (
                "403: the licence is not accepted for this account",
                f"accept it at {url} (logged in as the account whose token icedit uses)",
            )
        return (
            "401: gated repo and not logged in",
            f"log in (`hf auth login`, or set HF_TOKEN) and accept the licence at {url}",
        )
    if isinstance(error, RevisionNotFoundError):
        return (
            f"no revision '{artifact.revision}' in the repo",
            f"check {_revision_option(artifact)} (a commit, tag or branch)",
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            "no such repo on the hub",
            f"check {artifact.option} (a private repo also needs `hf auth login`)",
        )
    if isinstance(error, OfflineModeIsEnabled):
        return "offline mode is set (HF_HUB_OFFLINE)", "unset HF_HUB_OFFLINE to download it"
    if isinstance(error, HfHubHTTPError) and status == 401:
        return (
            "401: the hub refused the token (expired or invalid)",
            "log in again (`hf auth login`) or unset HF_TOKEN",
        )
    if isinstance(error, HfHubHTTPError):
        return f"the hub answered {status or 'an error'}: {first_line(error)}", None
    if isinstance(error, OSError) and getattr(error, "errno", None) == 28:
        return (
            "no space left on the disk of the Hugging Face cache",
            "free some space or point HF_HOME elsewhere",
        )
    return (
        f"the hub at {constants.ENDPOINT} cannot be reached ({type(error).__name__}: {first_line(error)})",
        "check the network or proxy (HTTPS_PROXY), or download it elsewhere: " + _hf_download(artifact),
    )


def _revision_option(artifact: Artifact) -> str:
    """The flag that pins `artifact`'s revision: --revision for the pipeline (--model), else --lora-revision, ..."""
    return "--revision" if artifact.option == "--model" else f"{artifact.option}-revision"


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def download_command(artifact: Artifact) -> str | None:
    """The `hf download` line that fetches exactly what `patterns` allows (before the index is known);
    `hf` takes one pattern per --include."""
    return None if artifact.local else _hf_download(artifact)


def _hf_download(artifact: Artifact) -> str:
    """`download_command` of a hub artifact."""
    revision = f" --revision {artifact.revision}" if artifact.revision else ""
    include = " ".join(f"--include '{p}'" for p in patterns(artifact))
    return f"hf download {artifact.ref}{revision} {include}"


# ---------------------------------------------------------------------------------------------- acting


def preflight(artifacts: list[Artifact]) -> list[ArtifactStatus]:
    """Check every artifact; raise one WeightsMissing listing each required one that can't be had now
    (optional ones with their fallback too); else fetch what is missing and return the statuses. The
    free space must hold what the required ones still need; an optional one that does not fit too is
    left out (its fallback runs)."""
    statuses = [status(a) for a in _unique(artifacts)]
    missing = [s for s in statuses if not s.usable]
    if any(s.artifact.required for s in missing):
        if len(missing) == 1:
            raise WeightsMissing(missing[0].line())
        blocked = sum(s.artifact.required for s in missing)
        optional = f" (and {len(missing) - blocked} optional)" if len(missing) > blocked else ""
        summary = (
            f"{blocked} of the {len(statuses)} model artifacts this command needs{optional} cannot be had now"
            f"{' (offline mode is set: HF_HUB_OFFLINE)' if offline_mode() else ''}; `icedit models` shows "
            "them all, `icedit download` fetches them, `--preset tiny` runs offline with random weights:"
        )
        raise WeightsMissing("\n".join([summary, *(f"  {s.line()}" for s in missing)]))
    fetching = [s for s in statuses if s.usable and not s.cached]
    free, where = shutil.disk_usage(_existing(cache_folder())).free, _existing(cache_folder())
    need = sum(s.to_download or 0 for s in fetching if s.artifact.required)
    if need > free:
        raise WeightsMissing(
            f"no space left for the download: {gib(need)} to fetch ("
            f"{', '.join(s.artifact.name for s in fetching if s.artifact.required)}), {gib(free)} "
            f"free on {where}; free some space or point HF_HOME at a bigger disk"
        )
    for s in fetching:
        if not s.artifact.required:
            if need + (s.to_download or 0) > free:
                s.problem = (
                    f"no space left: {gib(s.to_download or 0)} more to download, {gib(free - need)} free"
                )
                s.fix = "free some space, or point HF_HOME (or HF_HUB_CACHE) at a bigger disk"
            else:
                need += s.to_download or 0
    return [_fetch(s) if s.usable and not s.cached else s for s in statuses]


def _unique(artifacts: list[Artifact]) -> list[Artifact]:
    """One entry per (reference, revision, file); required wins over optional."""
    seen: dict[tuple, Artifact] = {}
    for a in artifacts:
        key = (a.ref, a.revision, a.layout, a.filename)
        if key not in seen or (a.required and not seen[key].required):
            seen[key] = a
    return list(seen.values())


def _fetch(found: ArtifactStatus) -> ArtifactStatus:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    a = found.artifact
    show = sys.stderr.isatty()
    was_disabled = are_progress_bars_disabled()
    print(f"downloading the {a.role} {a.name} ({gib(found.to_download or 0)})", file=sys.stderr)
    if not show:
        disable_progress_bars()
    try:
        # the files the status listed (its model_index.json read already); by the revision asked for, not
        # the commit it resolved to: only then does the cache record refs/<revision>, which is how
        # `status` finds the snapshot again, offline
        folder = snapshot_download(a.ref, revision=a.revision, allow_patterns=found.files)
    except Exception as e:  # noqa: BLE001 - one line with the hub's reason
        problem, fix = _why(e, a)
        raise WeightsMissing(
            f"downloading the {a.role} '{a.name}' failed: {problem}" + (f"; {fix}" if fix else "")
        ) from None
    finally:
        if not was_disabled:
            enable_progress_bars()
    lacking = folder_problem(a, Path(folder))
    if lacking:
        raise WeightsMissing(f"the downloaded {a.role} '{a.name}': {lacking}")
    return status(a)


def on_disk(artifact: Artifact) -> Path | None:
    """The folder (or file, for layout 'file') to load `artifact` from, when it is complete on disk;
    None when it is not (the hub is not asked)."""
    found = _disk_status(artifact)
    return _load_path(found) if found.cached else None


def locate(artifact: Artifact) -> Path:
    """`on_disk`, fetching the artifact first when it is not there; one line when it can't be had."""
    found = status(artifact)
    if not found.cached:
        if not found.usable:
            raise WeightsMissing(found.line())
        found = _fetch(found)
    return _load_path(found)


def _load_path(found: ArtifactStatus) -> Path:
    path = Path(found.path or "")
    return (
        path / (found.artifact.filename or "") if found.artifact.layout == "file" and path.is_dir() else path
    )
