"""Building the FluxFillPipeline an engine runs: weights from a preset, a hub id or a local folder,
then the adapter (a LoRA-MoE when the checkpoint has `lora_route` keys, else a stock diffusers
LoRA), then the device or an offload mode.

Both are `Artifact`s (`artifacts`): the host checks and fetches them before anything loads, and
the loaders read them from disk (`hub.locate`). An adapter given by hub id is resolved to its
file first, so the keys that tell a LoRA-MoE from a stock LoRA are read from the real file.

Weights are untrusted files: everything loads from safetensors only, nothing is unpickled, no
remote code runs, and hub references can be pinned to a revision (`--revision`, `--lora-revision`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from assistant import hub
from assistant.errors import UserError
from assistant.hub import Artifact
from assistant.models import AdapterInfo, WeightsInfo
from plugins.icedit.options import FluxOptions, IceditOptions
from plugins.icedit.presets import build_tiny, get_preset

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' default adapter file name, which the published ICEdit adapters (normal and MoE) use."""

OOM_HINT = "try --offload encoders (or model, sequential), --quantize int8, or a smaller image"
TINY_MOE = "tiny-moe"
"""A random LoRA-MoE adapter in the published format, built for the loaded model (4 experts, rank 4)."""


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: str):
    """bf16 on CUDA, fp32 elsewhere, unless asked otherwise."""
    import torch

    return (
        getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )


def flux_artifact(model: str, revision: str | None = None) -> Artifact:
    return Artifact(
        role="FLUX.1 Fill pipeline",
        ref=model,
        revision=None if hub.is_local(model) else revision,
        layout="diffusers",
        option="--model",
    )


def lora_artifact(lora: str, revision: str | None = None, weight_name: str | None = None) -> Artifact:
    """The adapter file: a .safetensors file, a folder holding it, a training run folder (its adapter/),
    or a hub repo. Without `--lora-weight-name`, the diffusers default name, else the only .safetensors
    there, as diffusers' own `load_lora_weights` guesses (the official demo loads repos that way)."""
    name = weight_name or WEIGHTS_NAME
    ref = lora
    if hub.is_local(lora):
        path = Path(lora).expanduser()
        if path.is_dir() and not (path / name).exists() and (path / "adapter" / name).is_file():
            ref = str(path / "adapter")  # an `icedit train` run folder
    return Artifact(
        role="LoRA",
        ref=ref,
        revision=None if hub.is_local(lora) else revision,
        layout="file",
        filename=name,
        guess_filename=weight_name is None,
        option="--lora",
        adapter=True,
    )


def artifacts(options: IceditOptions) -> list[Artifact]:
    """The weights `load_pipeline` will read with these options (none for the in-process tiny model)."""
    preset = get_preset(options.preset)
    model = options.model or preset.model
    lora = options.lora or preset.lora
    found = [flux_artifact(model, options.revision)] if model else []
    if lora and lora not in ("none", TINY_MOE):
        found.append(lora_artifact(lora, options.lora_revision, options.lora_weight_name))
    return found


class Loaded(NamedTuple):
    pipe: Any
    random_weights: bool
    adapter: AdapterInfo | None
    model: WeightsInfo | None
    """Where the weights came from, for a replay elsewhere (None: built in-process, as the preset says)."""


def weights_info(artifact: Artifact | None) -> WeightsInfo | None:
    """The base model as provenance: its hub id or folder and the commit it came from."""
    return None if artifact is None else WeightsInfo(source=artifact.ref, revision=hub.commit(artifact))


def load_pipeline(options: IceditOptions) -> Loaded:
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
        from diffusers import FluxFillPipeline

        pipe = from_pretrained(FluxFillPipeline, flux_artifact(model, options.revision), dtype)
    lora = options.lora or preset.lora
    adapter = _load_adapter(pipe, lora, options) if lora and lora != "none" else None
    ready(pipe, options, device)
    shipped = preset.bundled and options.model is None
    artifact = flux_artifact(model, options.revision) if model and not shipped else None
    return Loaded(
        pipe,
        preset.random_weights and options.model is None,
        adapter,
        weights_info(artifact),
    )


def ready(pipe, options: FluxOptions, device: str) -> None:
    """Quantize, place (or offload) and compile the loaded pipeline as the options say; running out of
    memory on the way is one line."""
    import torch

    try:
        if options.quantize != "none":
            quantize(pipe.transformer, options.quantize, device)
        place(pipe, device, options.offload)
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory placing the model on {device}: {OOM_HINT}") from None
    if options.compile:
        pipe.transformer.compile(dynamic=False)  # compiles at the first step of each new shape


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
        raise UserError(
            f"--quantize {mode} needs torchao: pip install 'icedit-assistant[quantize]'"
        ) from None
    if mode == "fp8" and not (
        device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 9)
    ):
        raise UserError(
            "--quantize fp8 needs a CUDA GPU of compute capability 8.9 or newer; try --quantize int8"
        )
    transformer.to(device)
    config = Float8WeightOnlyConfig() if mode == "fp8" else Int8WeightOnlyConfig()
    quantize_(
        transformer, config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lora" not in name
    )


def from_pretrained(pipeline_class, artifact: Artifact, dtype):
    """A diffusers pipeline from the folder or hub repo `artifact` names (fetched first), safetensors only."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    folder = hub.locate(artifact)
    diffusers_logging.disable_progress_bar()  # a bar per component load is noise in a chat or a pipe
    transformers_logging.disable_progress_bar()  # the prompt encoders' weights bars, the same
    try:
        pipe = pipeline_class.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise UserError(f"cannot load the {artifact.role} from {artifact.ref}: {hub.first_line(e)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_kind(options: IceditOptions) -> str:
    """'lora-moe', 'lora', 'none', or 'unknown' (not on disk yet), without loading any weights."""
    lora = options.lora or get_preset(options.preset).lora
    if not lora or lora == "none":
        return "none"
    if lora == TINY_MOE:
        return "lora-moe"
    try:
        path = hub.on_disk(lora_artifact(lora, options.lora_revision, options.lora_weight_name))
    except UserError:
        return "unknown"
    return adapter_file_kind(path) if path is not None else "unknown"


def adapter_file_kind(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - unreadable: the load will say why
        return "unknown"
    return "lora-moe" if any(".lora_route." in k for k in keys) else "lora"


def _load_adapter(pipe, lora: str, options: IceditOptions) -> AdapterInfo:
    from plugins.icedit import moe, moe_checkpoint

    routing = moe_checkpoint.Routing()
    if lora == TINY_MOE:
        state = moe_checkpoint.synthetic_checkpoint(
            pipe.transformer, num_experts=4, rank=4, seed=1, scale=0.3
        )
    else:
        artifact = lora_artifact(lora, options.lora_revision, options.lora_weight_name)
        path = hub.locate(artifact)
        if adapter_file_kind(path) != "lora-moe":
            return load_stock_lora(pipe, lora, path, options.lora_scale, hub.commit(artifact))
        state, routing = moe_checkpoint.read_checkpoint(path), moe_checkpoint.read_routing(path)
    _check_finite(state, lora)
    report = moe_checkpoint.load_lora_moe(pipe.transformer, state, top_k=options.top_k, routing=routing)
    moe.set_scale(pipe.transformer, options.lora_scale)
    return AdapterInfo(
        kind="lora-moe",
        source=lora,
        keys=report.keys,
        num_experts=report.num_experts,
        top_k=report.top_k,
        gate=report.gate,
        scale=options.lora_scale,
        revision=None if lora == TINY_MOE else hub.commit(artifact),
    )


def _check_finite(state, lora: str) -> None:
    """Refuse an adapter with NaN or infinite weights before it is placed: it would paint black pictures."""
    import torch

    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"the adapter {lora} has NaN or infinite weights ({key}): it is damaged or its training "
                "diverged; nothing was loaded"
            )


def load_stock_lora(pipe, lora: str, path: Path, scale: float, revision: str | None) -> AdapterInfo:
    try:  # use_safetensors=True: diffusers never falls back to unpickling a .bin
        state = pipe.lora_state_dict(str(path.parent), weight_name=path.name, use_safetensors=True)
        weights = state[0] if isinstance(state, tuple) else state
        keys = len(weights)
        _check_finite(weights, lora)
        pipe.load_lora_weights(
            str(path.parent), weight_name=path.name, adapter_name="icedit", use_safetensors=True
        )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise UserError(f"cannot load the LoRA from {lora}: {hub.first_line(e)}") from None
    pipe.set_adapters(["icedit"], adapter_weights=[scale])
    return AdapterInfo(kind="lora", source=lora, keys=keys, scale=scale, revision=revision)
