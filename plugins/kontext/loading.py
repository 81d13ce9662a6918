"""Building the FluxKontextPipeline the engine runs: weights from a preset, a hub id or a local folder,
then an optional stock diffusers LoRA, then the device or an offload mode.

The device, dtype, offload, quantization and LoRA handling are ICEdit's (imported, not copied):
both engines run FLUX pipelines with the same components. Weights are untrusted files, so, as
there, everything loads from safetensors only, no remote code runs, and the model and the adapter
are `Artifact`s the host checks and fetches before anything loads (`hub.locate` reads them)."""

from __future__ import annotations

from assistant import hub
from assistant.errors import UserError
from assistant.hub import Artifact
from assistant.models import AdapterInfo
from plugins.icedit.loading import (
    TINY_MOE,
    Loaded,
    from_pretrained,
    lora_artifact,
    ready,
    resolve_device,
    resolve_dtype,
    weights_info,
)
from plugins.kontext.options import KontextOptions
from plugins.kontext.presets import build_tiny, get_preset


def kontext_artifact(model: str, revision: str | None = None) -> Artifact:
    return Artifact(
        role="FLUX.1 Kontext pipeline",
        ref=model,
        revision=None if hub.is_local(model) else revision,
        layout="diffusers",
        option="--model",
    )


def asked_lora(options: KontextOptions) -> str | None:
    """The adapter asked for, if any: Kontext has no preset adapter."""
    return options.lora if options.lora and options.lora != "none" else None


def artifacts(options: KontextOptions) -> list[Artifact]:
    """The weights `load_pipeline` will read with these options (none for the in-process tiny model)."""
    model = options.model or get_preset(options.preset).model
    found = [kontext_artifact(model, options.revision)] if model else []
    lora = asked_lora(options)
    if lora and lora != TINY_MOE:
        found.append(lora_artifact(lora, options.lora_revision, options.lora_weight_name))
    return found


def load_pipeline(options: KontextOptions) -> Loaded:
    """The pipeline ready to run, whether its weights are random, the adapter it carries, its model."""
    preset = get_preset(options.preset)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    model = options.model or preset.model
    if model is None:
        pipe = build_tiny()
        if dtype != pipe.dtype:
            pipe = pipe.to(dtype=dtype)
    else:
        from diffusers import FluxKontextPipeline

        pipe = from_pretrained(FluxKontextPipeline, kontext_artifact(model, options.revision), dtype)
    lora = asked_lora(options)
    adapter = _load_lora(pipe, lora, options) if lora else None
    ready(pipe, options, device)
    artifact = kontext_artifact(model, options.revision) if model else None
    return Loaded(
        pipe,
        preset.random_weights and options.model is None,
        adapter,
        weights_info(artifact),
    )


def _load_lora(pipe, lora: str, options: KontextOptions) -> AdapterInfo:
    """A stock diffusers LoRA for the Kontext transformer; ICEdit's LoRA-MoE routes FLUX Fill only."""
    from plugins.icedit.loading import adapter_file_kind, load_stock_lora

    artifact = lora_artifact(lora, options.lora_revision, options.lora_weight_name)
    path = None if lora == TINY_MOE else hub.locate(artifact)
    if path is None or adapter_file_kind(path) == "lora-moe":
        raise UserError(
            f"{lora} is a LoRA-MoE adapter (ICEdit's, for FLUX.1 Fill): the kontext engine takes "
            "stock diffusers LoRAs only; use --lora none or --engine icedit"
        )
    return load_stock_lora(pipe, lora, path, options.lora_scale, hub.commit(artifact))
