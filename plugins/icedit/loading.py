"""Building the FluxFillPipeline an engine runs: weights from a preset, a hub id or a local folder,
then the adapter (a LoRA-MoE when the checkpoint has `lora_route` keys, else a stock diffusers
LoRA), then the device or an offload mode.

Weights are untrusted files: adapters load from safetensors only, nothing is unpickled, no remote
code runs, and hub references can be pinned to a revision (`--revision`, `--lora-revision`)."""

from __future__ import annotations

from pathlib import Path

from assistant.errors import UserError, WeightsMissing
from assistant.models import AdapterInfo
from assistant.settings import Settings
from plugins.hub import at_revision, check_repo_id, is_local, unavailable
from plugins.icedit.presets import build_tiny, get_preset

DOWNLOAD_HINT = (
    "download it on a machine with internet (`hf download {id}`; FLUX.1 dev repos are gated: accept the "
    "licence on huggingface.co first) or pass a local folder; `--preset tiny` runs offline with random weights"
)
OOM_HINT = "try --offload encoders (or model, sequential), --quantize int8, or a smaller image"
TINY_MOE = "tiny-moe"
"""A random LoRA-MoE adapter in the published format, built for the loaded model (4 experts, rank 4)."""


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: str):
    """bf16 on CUDA, fp32 elsewhere, unless asked otherwise."""
    import torch

    return getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)



def _fetch_error(what: str, ref: str, error: Exception, revision: str | None = None) -> UserError:
    """One line for a failed load. Hub clients raise OSError, ValueError or their HTTP library's errors."""
    if isinstance(error, UserError):
        return error
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if is_local(ref):
        return UserError(f"cannot load the {what} from {ref}: {reason}")
    download = ref if revision is None else f"{ref} --revision {revision}"
    return WeightsMissing(f"the {what} '{at_revision(ref, revision)}' is not in the Hugging Face cache and the hub "
                          "is unreachable: " + DOWNLOAD_HINT.format(id=download))


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
    lora = settings.lora or preset.lora
    adapter = _load_adapter(pipe, lora, settings) if lora and lora != "none" else None
    try:
        if settings.quantize != "none":
            quantize(pipe.transformer, settings.quantize, device)
        place(pipe, device, settings.offload)
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory placing the model on {device}: {OOM_HINT}") from None
    if settings.compile:
        pipe.transformer.compile(dynamic=False)  # compiles at the first step of each new shape
    return pipe, preset.random_weights and settings.model is None, adapter


def place(pipe, device: str, offload: str) -> None:
    """Move the pipeline to `device`, or split it between the CPU and the GPU.

    - encoders: the prompt encoders (T5-XXL: 9.5 GB in bf16) stay on the CPU and run there; the
      transformer and the VAE live on the GPU for good. That is the weights model offload holds at
      its peak (the transformer), without moving them in and out at every edit; a new prompt costs
      a T5 run on the CPU instead (repeated ones are cached, see `sampler.PromptCache`).
    - model / sequential: diffusers' CPU offload, one model or one layer at a time on the GPU.
    """
    if offload == "none":
        pipe.to(device)
    elif not device.startswith("cuda"):
        raise UserError(f"--offload {offload} moves weights between the CPU and a GPU; there is no GPU here")
    elif offload == "encoders":
        for part in (pipe.text_encoder, pipe.text_encoder_2):
            part.to("cpu")
        for part in (pipe.transformer, pipe.vae):
            part.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def quantize(transformer, mode: str, device: str) -> None:
    """Weight-only quantization of the transformer's base Linear layers; adapters stay in full precision."""
    import torch

    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise UserError(f"--quantize {mode} needs torchao: pip install 'icedit-assistant[quantize]'") from None
    if mode == "fp8" and not (device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 9)):
        raise UserError("--quantize fp8 needs a CUDA GPU of compute capability 8.9 or newer; try --quantize int8")
    transformer.to(device)
    config = Float8WeightOnlyConfig() if mode == "fp8" else Int8WeightOnlyConfig()
    quantize_(transformer, config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lora" not in name)


def _from_pretrained(model: str, dtype, revision: str | None = None):
    from diffusers import FluxFillPipeline

    if is_local(model) and not (Path(model).expanduser() / "model_index.json").is_file():
        raise UserError(f"{model} is not a FLUX.1 Fill pipeline folder (no model_index.json in it)")
    if not is_local(model):
        check_repo_id(model, "FLUX.1 Fill pipeline")
        if unavailable(model, "model_index.json", revision):
            raise _fetch_error("FLUX.1 Fill pipeline", model, OSError("not cached, hub unreachable"), revision)
    try:
        pipe = FluxFillPipeline.from_pretrained(str(Path(model).expanduser()) if is_local(model) else model,
                                                dtype=dtype, revision=None if is_local(model) else revision)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise _fetch_error("FLUX.1 Fill pipeline", model, e, revision) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_kind(lora: str | None, revision: str | None = None) -> str:
    """'lora-moe', 'lora', 'none', or 'unknown' (not on disk yet), without loading any weights."""
    if not lora or lora == "none":
        return "none"
    if lora == TINY_MOE:
        return "lora-moe"
    from safetensors import safe_open

    from plugins.icedit.moe import WEIGHTS_NAME

    path = Path(lora).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file() and not is_local(lora):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(lora, WEIGHTS_NAME, revision=revision)
        except ValueError:  # not a hub id either: the load will say so
            cached = None
        path = Path(cached) if isinstance(cached, str) else path
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        return "lora-moe" if any(".lora_route." in k for k in keys) else "lora"
    except Exception:  # noqa: BLE001 - missing or unreadable: the load will say why
        return "unknown"


def _load_adapter(pipe, lora: str, settings: Settings) -> AdapterInfo:
    from plugins.icedit import moe

    path = Path(lora).expanduser()
    if path.is_file() and path.suffix != ".safetensors":
        raise UserError(f"{lora}: adapters are read from .safetensors files only (pickle files can run code)")
    if lora == TINY_MOE:
        state = moe.synthetic_checkpoint(pipe.transformer, num_experts=4, rank=4, seed=1, scale=0.3)
    elif adapter_kind(lora, settings.lora_revision) == "lora-moe":
        state = moe.read_checkpoint(lora, settings.lora_revision)
    else:
        return _load_stock_lora(pipe, lora, settings.lora_scale, settings.lora_revision)
    report = moe.load_lora_moe(pipe.transformer, state, top_k=settings.top_k)
    moe.set_scale(pipe.transformer, settings.lora_scale)
    return AdapterInfo(kind="lora-moe", source=lora, keys=report.keys, num_experts=report.num_experts,
                       top_k=report.top_k, scale=settings.lora_scale)


def _load_stock_lora(pipe, lora: str, scale: float, revision: str | None = None) -> AdapterInfo:
    if is_local(lora) and not Path(lora).expanduser().exists():
        raise UserError(f"{lora}: no such LoRA file or folder")
    ref = str(Path(lora).expanduser()) if is_local(lora) else lora
    hub = {} if is_local(lora) else {"revision": revision}
    if not is_local(lora):
        check_repo_id(lora, "LoRA")
        if unavailable(lora, "pytorch_lora_weights.safetensors", revision):
            raise _fetch_error("LoRA", lora, OSError("not cached, hub unreachable"), revision)
    try:  # use_safetensors=True: diffusers never falls back to unpickling a .bin
        state = pipe.lora_state_dict(ref, use_safetensors=True, **hub)
        keys = len(state[0] if isinstance(state, tuple) else state)
        pipe.load_lora_weights(ref, adapter_name="icedit", use_safetensors=True, **hub)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise _fetch_error("LoRA", lora, e, revision) from None
    pipe.set_adapters(["icedit"], adapter_weights=[scale])
    return AdapterInfo(kind="lora", source=lora, keys=keys, scale=scale)
