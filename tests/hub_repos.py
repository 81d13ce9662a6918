"""Tiny random-weight stand-ins for the hub repos the assistant downloads, for `hub_server.HubServer`.

Built once per test session, in memory, from the tiny preset's FLUX Fill and `tiny_qwen`: the files have the
published repos' names and layout (diffusers folders plus the root-level ComfyUI copies in the FLUX repo), so a
downloader's choice of files can be checked.
"""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

from hub_server import Repo

FLUX = "black-forest-labs/FLUX.1-Fill-dev"
NORMAL_LORA = "RiverZ/normal-lora"
MOE_LORA = "sanaka87/ICEdit-MoE-LoRA"
QWEN_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN_3B = "Qwen/Qwen2.5-VL-3B-Instruct"
PICKLE_FLUX = "test/flux-pickle-only"
ROOT_COPIES = ("flux1-fill-dev.safetensors", "ae.safetensors")
"""The FLUX repo's root-level single-file checkpoints (ComfyUI's), which a diffusers-layout download skips."""


def read_folder(folder: Path) -> dict[str, bytes]:
    """A saved folder as a repo's files: {path in repo: content}."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _safetensors(state) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def _pickled(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same repo with each .safetensors weight file as the .bin pickle of older repos."""
    import torch
    from safetensors.torch import load

    out = {}
    for path, data in files.items():
        if not path.endswith(".safetensors"):
            out[path] = data
            continue
        buffer = io.BytesIO()
        torch.save(load(data), buffer)
        name = "diffusion_pytorch_model.bin" if "diffusion_pytorch_model" in path else "pytorch_model.bin"
        out[Path(path).with_name(name).as_posix()] = buffer.getvalue()
    return out


@functools.cache
def _flux_family() -> dict[str, Repo]:
    """The FLUX repo (branch "v2": x_embedder.bias all ones), its pickle-only twin, and both LoRA repos."""
    import torch
    from diffusers import FluxFillPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from plugins.icedit.loading import WEIGHTS_NAME
    from plugins.icedit.moe_checkpoint import synthetic_checkpoint
    from plugins.icedit.presets import build_tiny

    pipe = build_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        diffusers_files = read_folder(Path(tmp))
    card = {"README.md": b"---\nlicense: other\n---\n# tiny stand-in\n", "LICENSE.md": b"random weights\n"}
    main = (
        diffusers_files
        | card
        | {
            "flux1-fill-dev.safetensors": _safetensors(pipe.transformer.state_dict()),
            "ae.safetensors": _safetensors(pipe.vae.state_dict()),
        }
    )
    moe = _safetensors(synthetic_checkpoint(pipe.transformer, num_experts=4, rank=4, seed=1, scale=0.3))

    with torch.no_grad():
        pipe.transformer.x_embedder.bias.fill_(1.0)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    v2 = main | {weights: _safetensors(pipe.transformer.state_dict())}

    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
    pipe.transformer.add_adapter(config)
    layers = {
        k: v * 30 if "lora_B" in k else v for k, v in get_peft_model_state_dict(pipe.transformer).items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        FluxFillPipeline.save_lora_weights(
            tmp,
            transformer_lora_layers=layers,
            safe_serialization=True,
            transformer_lora_adapter_metadata=config.to_dict(),
        )
        lora = read_folder(Path(tmp))
    return {
        FLUX: Repo(main, gated=True, revisions={"v2": v2}),
        PICKLE_FLUX: Repo(_pickled(diffusers_files) | card),
        NORMAL_LORA: Repo(lora | {"README.md": b"# normal LoRA (tiny)\n"}),
        MOE_LORA: Repo({WEIGHTS_NAME: moe, "README.md": b"# LoRA-MoE (tiny)\n"}),
    }


@functools.cache
def qwen_files() -> dict[str, bytes]:
    """The tiny Qwen2.5-VL in the published repos' file layout."""
    from tiny_qwen import hub_layout, save_tiny_qwen

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_qwen(Path(tmp) / "saved")
        return read_folder(hub_layout(folder, Path(tmp) / "hub"))


def standard_repos() -> dict[str, Repo]:
    """{repo id: Repo} under the real repos' ids: FLUX Fill (gated; branch "v2"), both LoRAs, two Qwen VLs, pickle FLUX.

    Built once per session and shared: don't change them; build a `Repo` of your own instead.
    """
    qwen = qwen_files()
    return _flux_family() | {QWEN_7B: Repo(qwen), QWEN_3B: Repo(qwen)}
