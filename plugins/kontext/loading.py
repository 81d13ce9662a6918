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
from assistant.settings import Settings
from plugins.icedit.loading import (
    TINY_MOE,
    from_pretrained,
    lora_artifact,
    ready,
    resolve_device,
    resolve_dtype,
)
from plugins.kontext.presets import build_tiny, get_preset


def kontext_artifact(model: str, revision: str | None = None) -> Artifact:
    return Artifact(
        role="FLUX.1 Kontext pipeline",
        ref=model,
        revision=None if hub.is_local(model) else revision,
        layout="diffusers",
        option="--model",
    )


def asked_lora(settings: Settings) -> str | None:
    """The adapter asked for, if any: Kontext has no preset adapter."""
    return settings.lora if settings.lora and settings.lora != "none" else None


def artifacts(settings: Settings) -> list[Artifact]:
    """The weights `load_pipeline` will read for these settings (none for the in-process tiny model)."""
    model = settings.model or get_preset(settings.preset).model
    found = [kontext_artifact(model, settings.revision)] if model else []
    lora = asked_lora(settings)
    if lora and lora != TINY_MOE:
        found.append(lora_artifact(lora, settings.lora_revision, settings.lora_weight_name))
    return found


def load_pipeline(settings: Settings):
    """(pipeline ready to run, whether its weights are random, the adapter it carries)."""
    preset = get_preset(settings.preset)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model = settings.model or preset.model
    if model is None:
        pipe = build_tiny()
        if dtype != pipe.dtype:
            pipe = pipe.to(dtype=dtype)
    else:
        from diffusers import FluxKontextPipeline

        pipe = from_pretrained(FluxKontextPipeline, kontext_artifact(model, settings.revision), dtype)
    lora = asked_lora(settings)
    adapter = _load_lora(pipe, lora, settings) if lora else None
    ready(pipe, settings, device)
    return pipe, preset.random_weights and settings.model is None, adapter


def _load_lora(pipe, lora: str, settings: Settings) -> AdapterInfo:
    """A stock diffusers LoRA for the Kontext transformer; ICEdit's LoRA-MoE routes FLUX Fill only."""
    from plugins.icedit.loading import adapter_file_kind, load_stock_lora

    path = (
        None
        if lora == TINY_MOE
        else hub.locate(lora_artifact(lora, settings.lora_revision, settings.lora_weight_name))
    )
    if path is None or adapter_file_kind(path) == "lora-moe":
        raise UserError(
            f"{lora} is a LoRA-MoE adapter (ICEdit's, for FLUX.1 Fill): the kontext engine takes "
            "stock diffusers LoRAs only; use --lora none or --engine icedit"
        )
    return load_stock_lora(pipe, lora, path, settings.lora_scale)
