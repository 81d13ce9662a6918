"""The real hub clients against `hub_server`: downloads, caching, gating, errors and resumes as on huggingface.co.

Each client runs in a subprocess (`run_client`): huggingface_hub reads HF_ENDPOINT and HF_HOME at import.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from hub_repos import FLUX, NORMAL_LORA, QWEN_7B, ROOT_COPIES, qwen_files, standard_repos
from hub_server import HubServer, Repo, client_env, run_client

GRANTED = "hf_granted"
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture
def repos():
    return standard_repos()


def download(repo_id: str, filename: str) -> str:
    """A client script: hf_hub_download one file and print its path."""
    return (
        "import json\nfrom huggingface_hub import hf_hub_download\n"
        f"print(json.dumps(hf_hub_download({repo_id!r}, {filename!r})))\n"
    )


def test_a_downloaded_file_is_then_served_offline_from_the_cache(hub, repos, tmp_path):
    server = hub(repos)
    path = run_client(download(QWEN_7B, "config.json"), client_env(server, tmp_path))
    assert Path(path).read_bytes() == repos[QWEN_7B].files["config.json"]
    assert [(r.method, r.status) for r in server.requests] == [("HEAD", 200), ("GET", 200)]

    offline = (
        "import json\nfrom huggingface_hub import hf_hub_download\n"
        f"cached = hf_hub_download({QWEN_7B!r}, 'config.json')\n"
        f"try:\n    hf_hub_download({QWEN_7B!r}, 'model.safetensors')\n"
        "except Exception as e:\n    print(json.dumps([cached, type(e).__name__]))\n"
    )
    assert run_client(offline, client_env(server, tmp_path, offline=True)) == [
        path,
        "LocalEntryNotFoundError",
    ]
    assert len(server.requests) == 2


def test_an_unreachable_hub_serves_the_cache_and_retries_an_uncached_file_for_23_seconds(
    hub, repos, tmp_path
):
    server = hub(repos)
    path = run_client(download(QWEN_7B, "config.json"), client_env(server, tmp_path))
    server.stop()  # nothing listens on its port any more
    code = (
        "import json, time\nsleeps = []\ntime.sleep = sleeps.append  # the client's backoff, recorded not slept\n"
        f"from huggingface_hub import hf_hub_download\ncached = hf_hub_download({QWEN_7B!r}, 'config.json')\n"
        f"try:\n    hf_hub_download({QWEN_7B!r}, 'model.safetensors')\n"
        "except Exception as e:\n"
        "    print(json.dumps([cached, type(e).__name__, type(e.__cause__).__name__, sleeps]))\n"
    )
    assert run_client(code, client_env(server, tmp_path)) == [
        path,
        "LocalEntryNotFoundError",
        "ConnectError",
        [1, 2, 4, 8, 8],
    ]


def test_model_info_with_files_metadata_gives_sizes_and_lfs_hashes(hub, repos, tmp_path):
    server = hub(repos)
    code = (
        "import json\nfrom huggingface_hub import HfApi\napi = HfApi()\n"
        "def info(**kw):\n    i = api.model_info(**kw)\n"
        "    return [i.sha, i.gated, {s.rfilename: [s.size, s.lfs and s.lfs.sha256] for s in i.siblings}]\n"
        f"print(json.dumps([info(repo_id={FLUX!r}, files_metadata=True), info(repo_id={FLUX!r}, revision='v2'),"
        f" info(repo_id={NORMAL_LORA!r}, files_metadata=True)]))\n"
    )
    flux_info, v2_info, lora_info = run_client(code, client_env(server, tmp_path))
    (sha, gated, files), (v2_sha, _, v2_files), (_, lora_gated, lora_files) = flux_info, v2_info, lora_info
    assert gated == "manual" and lora_gated is False  # a gated repo's model info is public
    assert sha != v2_sha and set(v2_files) == set(files) and v2_files["model_index.json"] == [None, None]
    flux = repos[FLUX].files
    assert files["model_index.json"] == [len(flux["model_index.json"]), None]
    for name in ("transformer/diffusion_pytorch_model.safetensors", *ROOT_COPIES):
        assert files[name] == [len(flux[name]), hashlib.sha256(flux[name]).hexdigest()]
    assert lora_files[LORA] == [
        len(repos[NORMAL_LORA].files[LORA]),
        hashlib.sha256(repos[NORMAL_LORA].files[LORA]).hexdigest(),
    ]
    assert next((r.path, r.params) for r in server.requests) == (f"/api/models/{FLUX}", {"blobs": "true"})


def test_snapshot_download_fetches_only_the_allowed_files(hub, repos, tmp_path):
    server = hub(repos, granted_tokens={GRANTED})
    code = (
        "import json, os\nfrom huggingface_hub import snapshot_download\n"
        f"root = snapshot_download({FLUX!r}, allow_patterns=['vae/*', 'model_index.json'])\n"
        "print(json.dumps({os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read().hex()"
        " for d, _, fs in os.walk(root) for f in fs}))\n"
    )
    got = run_client(code, client_env(server, tmp_path, token=GRANTED))
    wanted = ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert got == {name: repos[FLUX].files[name].hex() for name in wanted}
    assert sorted(server.downloads(FLUX)) == wanted
    assert {r.authorization for r in server.requests} == {f"Bearer {GRANTED}"}


def test_gated_unknown_and_missing_raise_the_hub_clients_own_errors(hub, repos, tmp_path):
    server = hub(repos, granted_tokens={GRANTED})
    code = (
        "import json\nfrom huggingface_hub import HfApi, hf_hub_download\napi = HfApi()\n"
        "def error(call, *args, **kw):\n    try:\n        call(*args, **kw)\n        return None\n"
        "    except Exception as e:\n        return [type(e).__name__, e.response.status_code]\n"
        f"print(json.dumps({{\n"
        f"  'gated, no token': error(hf_hub_download, {FLUX!r}, 'model_index.json'),\n"
        f"  'gated, not granted': error(hf_hub_download, {FLUX!r}, 'model_index.json', token='hf_other'),\n"
        f"  'gated, granted': error(hf_hub_download, {FLUX!r}, 'model_index.json', token={GRANTED!r}),\n"
        f"  'auth check, no token': error(api.auth_check, {FLUX!r}),\n"
        f"  'auth check, not granted': error(api.auth_check, {FLUX!r}, token='hf_other'),\n"
        f"  'auth check, granted': error(api.auth_check, {FLUX!r}, token={GRANTED!r}),\n"
        "  'unknown repo, no token': error(hf_hub_download, 'nobody/nothing', 'config.json'),\n"
        "  'unknown repo, token': error(hf_hub_download, 'nobody/nothing', 'config.json', token='hf_other'),\n"
        "  'unknown repo info': error(api.model_info, 'nobody/nothing'),\n"
        f"  'unknown revision': error(hf_hub_download, {QWEN_7B!r}, 'config.json', revision='v9'),\n"
        f"  'unknown revision info': error(api.model_info, {QWEN_7B!r}, revision='v9'),\n"
        f"  'missing file': error(hf_hub_download, {QWEN_7B!r}, 'nope.json'),\n"
        "}))\n"
    )
    assert run_client(code, client_env(server, tmp_path)) == {
        "gated, no token": ["GatedRepoError", 401],
        "gated, not granted": ["GatedRepoError", 403],
        "gated, granted": None,
        "auth check, no token": ["GatedRepoError", 401],
        "auth check, not granted": ["GatedRepoError", 403],
        "auth check, granted": None,
        "unknown repo, no token": ["RepositoryNotFoundError", 401],
        "unknown repo, token": ["RepositoryNotFoundError", 404],
        "unknown repo info": ["RepositoryNotFoundError", 401],
        "unknown revision": ["RevisionNotFoundError", 404],
        "unknown revision info": ["RevisionNotFoundError", 404],
        "missing file": ["RemoteEntryNotFoundError", 404],
    }


def test_an_interrupted_download_is_resumed_with_a_range_request(hub, tmp_path):
    chunk = (
        10 * 2**20
    )  # huggingface_hub writes what it received in chunks of this size: a cut resumes after one
    data = random.Random(0).randbytes(chunk + 2**20)
    server = hub({"test/big": Repo({"big.safetensors": data})})
    server.fail_once("test/big", "big.safetensors", after_bytes=chunk + 5000)
    path = run_client(download("test/big", "big.safetensors"), client_env(server, tmp_path))
    assert Path(path).read_bytes() == data
    # the client retries by itself, within the same call, from the last whole chunk it wrote
    assert [(r.method, r.range, r.status) for r in server.requests] == [
        ("HEAD", None, 200),
        ("GET", None, 200),
        ("GET", f"bytes={chunk}-", 206),
    ]


def test_stop_cuts_open_connections_and_frees_the_port(hub, repos):
    before = threading.active_count()
    server = hub(repos)
    host, port = server.server_address
    connection = http.client.HTTPConnection(host, port, timeout=5)
    connection.request("GET", f"/api/models/{QWEN_7B}")
    assert json.loads(connection.getresponse().read())["id"] == QWEN_7B  # and the connection stays open
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2 and threading.active_count() == before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5)


HEAVY = f"""
import json
import numpy as np
import torch
from PIL import Image
from diffusers import FluxFillPipeline
from transformers import Qwen2_5_VLForConditionalGeneration

pipe = FluxFillPipeline.from_pretrained({FLUX!r}, use_safetensors=True)
v2 = FluxFillPipeline.from_pretrained({FLUX!r}, revision="v2", use_safetensors=True)
image, mask = Image.new("RGB", (32, 32), (200, 80, 40)), Image.new("L", (32, 32), 255)

def edit():
    return pipe("a hat", image=image, mask_image=mask, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]

base = edit()
repeat = float(np.abs(edit() - base).max())
pipe.load_lora_weights({NORMAL_LORA!r})
qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained({QWEN_7B!r}, use_safetensors=True)
print(json.dumps({{
    "bias": [float(p.transformer.x_embedder.bias.abs().max()) for p in (pipe, v2)],
    "lora_change": [repeat, float(np.abs(edit() - base).mean())],
    "qwen": [type(qwen).__name__, float(sum(t.double().abs().sum() for t in qwen.state_dict().values()))],
}}))
"""


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """One subprocess loads FLUX Fill (gated, main and v2), the normal LoRA and Qwen2.5-VL through the real loaders."""
    with HubServer(standard_repos(), {GRANTED}) as server:
        results = run_client(
            HEAVY, client_env(server, tmp_path_factory.mktemp("hf"), token=GRANTED), timeout=300
        )
    return server, results


def test_diffusers_loads_the_gated_flux_repo_with_a_granted_token_at_both_revisions(heavy):
    from safetensors.torch import load

    server, results = heavy
    weights = "transformer/diffusion_pytorch_model.safetensors"
    bias = float(load(standard_repos()[FLUX].files[weights])["x_embedder.bias"].abs().max())
    assert results["bias"] == [bias, 1.0] and bias != 1.0  # v2's bias is all ones
    main = set(standard_repos()[FLUX].files) - {"README.md", "LICENSE.md", *ROOT_COPIES}
    assert sorted(server.downloads(FLUX)) == sorted([*main, weights])  # v2 shares every other blob with main


def test_diffusers_own_patterns_skip_the_root_level_single_file_copies(heavy):
    server, _ = heavy
    fetched = [r.path for r in server.requests if "/resolve/" in r.path]
    assert not [p for p in fetched if p.endswith((*ROOT_COPIES, "README.md", "LICENSE.md"))]


def test_load_lora_weights_from_the_hub_changes_the_edit(heavy):
    server, results = heavy
    assert server.downloads(NORMAL_LORA) == [LORA] and results["lora_change"][0] == 0
    assert results["lora_change"][1] > 0.003  # over a pixel level in 255


def test_transformers_loads_qwen_vl_from_the_hub(heavy):
    from safetensors.torch import load

    server, results = heavy
    weights = load(qwen_files()["model.safetensors"]).values()
    served = float(sum(t.double().abs().sum() for t in weights))
    assert results["qwen"] == ["Qwen2_5_VLForConditionalGeneration", pytest.approx(served, rel=1e-12)]
    assert {"config.json", "model.safetensors"} <= set(server.downloads(QWEN_7B))


def test_the_clients_called_no_endpoint_the_server_lacks(heavy):
    server, _ = heavy
    assert server.requests and all(r.authorization == f"Bearer {GRANTED}" for r in server.requests)
    assert [r for r in server.requests if r.status == 404 and r.error is None] == []
