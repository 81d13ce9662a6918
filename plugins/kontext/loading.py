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
    OOM_HINT,
    TINY_MOE,
    lora_artifact,
    place,
    quantize,
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


def _lora(settings: Settings) -> str | None:
    """The adapter asked for, if any: Kontext has no preset adapter."""
    return settings.lora if settings.lora and settings.lora != "none" else None


def artifacts(settings: Settings) -> list[Artifact]:
    """The weights `load_pipeline` will read for these settings (none for the in-process tiny model)."""
    model = settings.model or get_preset(settings.preset).model
    found = [kontext_artifact(model, settings.revision)] if model else []
    lora = _lora(settings)
    if lora and lora != TINY_MOE:
        found.append(lora_artifact(lora, settings.lora_revision, settings.lora_weight_name))
    return found


def load_pipeline(settings: Settings):
    """(pipeline ready to run, whether its weights are random, the adapter it carries)."""
    import torch

    preset = get_preset(settings.preset)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model = settings.model or preset.model
    if model is None:
        pipe = build_tiny()
        if dtype != pipe.dtype:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = _from_pretrained(model, dtype, settings.revision)
    lora = _lora(settings)
    adapter = _load_lora(pipe, lora, settings) if lora else None
    try:
        if settings.quantize != "none":
            quantize(pipe.transformer, settings.quantize, device)
        place(pipe, device, settings.offload)
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory placing the model on {device}: {OOM_HINT}") from None
    if settings.compile:
        pipe.transformer.compile(dynamic=False)
    return pipe, preset.random_weights and settings.model is None, adapter


def _from_pretrained(model: str, dtype, revision: str | None = None):
    """FluxKontextPipeline from a folder or a hub id (fetched first), safetensors only."""
    from diffusers import FluxKontextPipeline
    from diffusers.utils import logging as diffusers_logging

    folder = hub.locate(kontext_artifact(model, revision))
    diffusers_logging.disable_progress_bar()
    try:
        pipe = FluxKontextPipeline.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise UserError(
            f"cannot load the FLUX.1 Kontext pipeline from {model}: {hub.first_line(e)}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
