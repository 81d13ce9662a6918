"""Building the FluxFillPipeline an engine runs: from a preset, a hub id or a local folder."""

from __future__ import annotations

from pathlib import Path

from assistant.errors import UserError, WeightsMissing
from assistant.settings import Settings
from plugins.icedit.presets import build_tiny, get_preset

DOWNLOAD_HINT = (
    "download it on a machine with internet (`hf download {id}`; FLUX.1 dev repos are gated: accept the "
    "licence on huggingface.co first) or pass a local folder; `--preset tiny` runs offline with random weights"
)


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: str):
    """bf16 on CUDA, fp32 elsewhere, unless asked otherwise."""
    import torch

    return getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def _is_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).exists()


def _fetch_error(what: str, ref: str, error: Exception) -> UserError:
    """One line for a failed load. Hub clients raise OSError, ValueError or their HTTP library's errors."""
    if isinstance(error, UserError):
        return error
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if _is_local(ref):
        return UserError(f"cannot load the {what} from {ref}: {reason}")
    return WeightsMissing(f"the {what} '{ref}' is not in the Hugging Face cache and the hub is unreachable: "
                          + DOWNLOAD_HINT.format(id=ref))


def load_pipeline(settings: Settings):
    """(pipeline on its device, whether its weights are random)."""
    preset = get_preset(settings.preset)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model = settings.model or preset.model
    if model is None:
        pipe = build_tiny()
        if dtype != pipe.dtype:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = _from_pretrained(model, dtype)
    lora = settings.lora or preset.lora
    if lora and lora != "none":
        _load_lora(pipe, lora)
    return pipe.to(device), preset.random_weights and settings.model is None


def _from_pretrained(model: str, dtype):
    from diffusers import FluxFillPipeline

    if _is_local(model) and not (Path(model).expanduser() / "model_index.json").is_file():
        raise UserError(f"{model} is not a FLUX.1 Fill pipeline folder (no model_index.json in it)")
    try:
        pipe = FluxFillPipeline.from_pretrained(str(Path(model).expanduser()) if _is_local(model) else model,
                                                dtype=dtype)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise _fetch_error("FLUX.1 Fill pipeline", model, e) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_lora(pipe, lora: str) -> None:
    if _is_local(lora) and not Path(lora).expanduser().exists():
        raise UserError(f"{lora}: no such LoRA file or folder")
    try:
        pipe.load_lora_weights(str(Path(lora).expanduser()) if _is_local(lora) else lora, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise _fetch_error("LoRA", lora, e) from None
