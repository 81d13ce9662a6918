"""What FLUX.1 Fill holds in memory under each placement the engine supports (`--offload`, `--quantize`).

Sizes come from the real architectures: each model is built on the meta device from its config in
`presets` (shapes, no weights) and its parameters and buffers are counted, once per process. Working
memory comes from the formulas below; their constants are live-allocation peaks of one forward pass
measured on a CPU (torch.profiler), for the GPU kit to check against CUDA's peaks. Together they give
~35.7 GB for everything on the GPU in bf16 and ~24.8 GB for model offload, where the official ICEdit
reports ~35 GB and 24 GB.
"""

from __future__ import annotations

import importlib.util
from functools import cache

from pydantic import BaseModel

from assistant.memory import (
    CPU_FLOPS,
    GPU_FLOPS,
    HOST_TO_GPU_BYTES_PER_S,
    Part,
    Placement,
)
from assistant.settings import Settings
from plugins.icedit.diptych import PANEL_WIDTH
from plugins.icedit.options import FluxOptions
from plugins.icedit.presets import CLIP_L_TEXT, FLUX_FILL_TRANSFORMER, FLUX_VAE, T5_XXL_ENCODER, get_preset

PANEL_HEIGHT = 768
"""The diptych planned for: two 512x768 panels, 1024x768 (a 3:4 portrait); a taller source (panels up
to 512x2048) needs proportionally more for the transformer's tokens and the VAE decode."""
PROMPT_TOKENS = {"text_encoder": 77, "text_encoder_2": 512}
"""Tokens each prompt encoder runs on: CLIP's context, and `encode_prompt`'s max_sequence_length for T5
(the transformer attends to all 512 as well)."""
BLOCK_WIDTHS = 17.5
"""Tensors of the hidden width (3072) alive per token at the peak of a FLUX block, SDPA materialising no
attention matrix: 17.2 measured in bf16 (diffusers' RMSNorm and RoPE work in fp32), 15.1 in fp32, the
same at 320, 640 and 1152 tokens (one double and one single block at full width)."""
VAE_DECODE_WIDTHS = 3.9
"""Tensors of the decoder's full-resolution input width (256 channels) alive per pixel at the decode's
peak, in its last up block: 3.8 measured in fp32, the same from 256x128 to 512x256 pixels."""
VAE_ENCODE_WIDTHS = 5.1
"""Same for the encoder's first width (128 channels), encoding the masked diptych: 5.0 in fp32."""
ENCODER_WIDTHS, ENCODER_SCORES = 12.0, 1.3
"""A prompt encoder's peak: ENCODER_WIDTHS tensors of d_model per token plus ENCODER_SCORES attention
matrices per head (T5 materialises its scores and keeps its position bias): 11.9 and 1.26 fitted to
one T5-XXL layer at 128, 256 and 512 tokens in fp32; bf16 takes the same number of elements."""
ADAPTER_RANK, ADAPTER_EXPERTS = 32, 4
"""The adapter counted on top of the transformer, for any `--lora`: the published ICEdit LoRA-MoE layout,
rank 32, 4 experts (`moe_checkpoint.synthetic_checkpoint`), 214M parameters. It is never quantized."""
QUANTIZED_SLOWDOWN = {"none": 1.0, "int8": 1.3, "fp8": 1.15}
"""Denoising time with torchao's weight-only quantization against bf16, an estimate until measured
(`benchmarks/edit.py --full`): the weights are dequantized inside each matmul, which at ~3.6k tokens is
compute-bound."""
SEQUENTIAL_BYTES_PER_S = 1.5e9
"""What sequential offload streams per second: accelerate's hooks copy each layer's weights as it runs,
one small synchronous copy at a time. black-forest-labs/flux#138 reports ~15 min for 50 steps of
FLUX.1-dev at 1344x768 on an RTX 3090: ~18 s a step for 24 GB."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class Size(BaseModel):
    """A model's element counts, from its meta build."""

    params: int
    buffers: int
    quantizable: int = 0
    """Elements of the base Linear weights torchao quantizes (the transformer's)."""
    scales: int = 0
    """Their output channels: one scale each once quantized."""
    largest_module: int
    """Elements held directly by its largest module: what sequential offload brings onto the GPU at once."""
    adapter: int = 0


class Component(BaseModel):
    """One model of the pipeline under some settings: bytes of its weights, and of its working memory."""

    params: int
    weights: int
    activation: int
    largest_module: int


def _counts(model, quantizable: bool = False) -> Size:
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)] if quantizable else []
    return Size(
        params=sum(p.numel() for p in model.parameters()),
        buffers=sum(b.numel() for b in model.buffers()),
        quantizable=sum(m.weight.numel() for m in linears),
        scales=sum(m.out_features for m in linears),
        largest_module=max(
            sum(t.numel() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
            for m in model.modules()
        ),
    )


@cache
def sizes() -> dict[str, Size]:
    """The four models' counts, keyed by their FluxFillPipeline attribute; built on meta in ~0.3 s, once."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from plugins.icedit.moe_checkpoint import synthetic_checkpoint

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_FILL_TRANSFORMER)
        models = {
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
            "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL_ENCODER)),
            "vae": AutoencoderKL(**FLUX_VAE),
        }
    adapter = synthetic_checkpoint(transformer, num_experts=ADAPTER_EXPERTS, rank=ADAPTER_RANK)
    out = {
        "transformer": _counts(transformer, quantizable=True).model_copy(
            update={"adapter": sum(t.numel() for t in adapter.values())}
        )
    }
    return out | {name: _counts(model) for name, model in models.items()}


def _tokens() -> int:
    """Image tokens of the planned diptych (VAE /8, then 2x2 patches) plus the T5 tokens."""
    return (2 * PANEL_WIDTH // 16) * (PANEL_HEIGHT // 16) + PROMPT_TOKENS["text_encoder_2"]


def _activations(dtype_bytes: int, batch: int) -> dict[str, int]:
    t = FLUX_FILL_TRANSFORMER
    pixels = 2 * PANEL_WIDTH * PANEL_HEIGHT
    widths = FLUX_VAE["block_out_channels"]  # the decoder runs them reversed: widths[1] reaches full size
    decode = batch * VAE_DECODE_WIDTHS * widths[1] * pixels
    encode = VAE_ENCODE_WIDTHS * widths[0] * pixels

    def encoder(width: int, heads: int, tokens: int) -> float:
        return ENCODER_WIDTHS * tokens * width + ENCODER_SCORES * heads * tokens**2

    elements = {
        "transformer": batch * _tokens() * BLOCK_WIDTHS * t["num_attention_heads"] * t["attention_head_dim"],
        "text_encoder": encoder(
            CLIP_L_TEXT["hidden_size"], CLIP_L_TEXT["num_attention_heads"], PROMPT_TOKENS["text_encoder"]
        ),
        "text_encoder_2": encoder(
            T5_XXL_ENCODER["d_model"], T5_XXL_ENCODER["num_heads"], PROMPT_TOKENS["text_encoder_2"]
        ),
        "vae": max(decode, encode),
    }
    return {name: int(n * dtype_bytes) for name, n in elements.items()}


def components(settings: Settings, options: FluxOptions, dtype: str | None = None) -> dict[str, Component]:
    """Each model's weights and working memory as `settings` load it (dtype, `--quantize`, the adapter, the
    early filter's batch of candidates), keyed by FluxFillPipeline attribute. The GPU kit compares these
    with measured peaks."""
    dtype = dtype or options.dtype or "bfloat16"
    d = DTYPE_BYTES[dtype]
    counts = sizes()
    activations = _activations(d, settings.candidates)
    lora = options.lora or get_preset(options.preset).lora
    out = {}
    for name, size in counts.items():
        weights = (size.params + size.buffers) * d
        if name == "transformer":
            if options.quantize != "none":  # 1 byte per quantized weight, a float32 scale per output channel
                weights += size.quantizable * (1 - d) + size.scales * 4
            if lora and lora != "none":
                weights += size.adapter * d
        out[name] = Component(
            params=size.params,
            weights=weights,
            activation=activations[name],
            largest_module=size.largest_module * d,
        )
    return out


def _nfe(settings: Settings) -> int:
    """Transformer passes per turn: the early filter's M*m candidate steps, then the winner's n - m."""
    if settings.candidates == 1:
        return settings.steps
    return settings.steps + (settings.candidates - 1) * settings.early_steps


def _flops(settings: Settings) -> tuple[float, float]:
    """(denoising, prompt encoding) FLOPs of one turn: 2 per parameter and token, plus attention."""
    counts, t = sizes(), FLUX_FILL_TRANSFORMER
    tokens = _tokens()
    layers = t["num_layers"] + t["num_single_layers"]
    width = t["num_attention_heads"] * t["attention_head_dim"]
    step = 2 * counts["transformer"].params * tokens + 4 * layers * tokens**2 * width
    encode = sum(2 * counts[name].params * n for name, n in PROMPT_TOKENS.items())
    return _nfe(settings) * step, encode


def parts(settings: Settings, options: FluxOptions) -> list[Part]:
    """FLUX.1 Fill's placements: bf16 / int8 / fp8 with the prompt encoders on the GPU or the CPU, model
    offload, sequential offload, and all on the CPU (int8 / fp8 only where torchao is installed, as
    `--quantize` needs it). [] for the tiny preset (a few MB of random weights)."""
    if options.model is None and get_preset(options.preset).model is None:
        return []
    dtype = options.dtype or "bfloat16"
    label = DTYPE_LABELS[dtype]
    denoise, encode = _flops(settings)
    base = components(settings, options.model_copy(update={"quantize": "none"}))
    t, clip, t5, vae = (base[n] for n in ("transformer", "text_encoder", "text_encoder_2", "vae"))
    encoders = clip.weights + t5.weights
    placements = []
    for mode in (
        ("none", "int8", "fp8") if importlib.util.find_spec("torchao") else ("none",)
    ):  # the [quantize] extra
        c = components(settings, options.model_copy(update={"quantize": mode}))["transformer"]
        what = label if mode == "none" else mode
        gpu_seconds = denoise / GPU_FLOPS * QUANTIZED_SLOWDOWN[mode]
        requires = (8, 9) if mode == "fp8" else None
        placements += [
            Placement(
                label=f"{what} on the GPU",
                resident_gpu=c.weights + encoders + vae.weights,
                activation_gpu=max(c.activation, clip.activation, t5.activation, vae.activation),
                cost=gpu_seconds + encode / GPU_FLOPS,
                requires=requires,
                settings={"device": "cuda", "offload": "none", "quantize": mode},
            ),
            Placement(
                label=f"{what}, prompt encoders on the CPU",
                resident_gpu=c.weights + vae.weights,
                activation_gpu=max(c.activation, vae.activation),
                cpu=encoders,
                cost=gpu_seconds + encode / CPU_FLOPS,
                requires=requires,
                settings={"device": "cuda", "offload": "encoders", "quantize": mode},
            ),
        ]
    # model offload: each model moves in when it runs and out when the next in diffusers' order does; the
    # VAE, last in that order, stays (the sampler never frees the hooks). The transformer moves twice with
    # the early filter (candidates, then the winner after the VAE previews).
    phase = max([*((m.weights, m.activation) for m in (t, clip, t5)), (0, vae.activation)], key=sum)
    moves = t.weights * (2 if settings.candidates > 1 else 1) + encoders
    placements.append(
        Placement(
            label=f"{label}, model offload",
            resident_gpu=vae.weights,
            transient_gpu=phase[0],
            activation_gpu=phase[1],
            cpu=t.weights + encoders,
            cost=denoise / GPU_FLOPS + encode / GPU_FLOPS + 2 * moves / HOST_TO_GPU_BYTES_PER_S,
            settings={"device": "cuda", "offload": "model", "quantize": "none"},
        )
    )
    # sequential offload streams every weight from the CPU each time it runs: the transformer at every step
    # (the candidates share the steps they run batched)
    streaming = (settings.steps * t.weights + encoders + vae.weights) / SEQUENTIAL_BYTES_PER_S
    placements.append(
        Placement(
            label=f"{label}, sequential offload",
            transient_gpu=max(m.largest_module for m in base.values()),
            activation_gpu=max(m.activation for m in base.values()),
            cpu=t.weights + encoders + vae.weights,
            cost=(denoise + encode) / GPU_FLOPS + streaming,
            settings={"device": "cuda", "offload": "sequential", "quantize": "none"},
            note=f"every layer streams from the CPU at each step: ~{streaming / 60:.0f} min a turn",
        )
    )
    cpu_dtype = options.dtype or "float32"  # loading's default off CUDA
    on_cpu = components(settings, options.model_copy(update={"quantize": "none"}), cpu_dtype)
    cpu_seconds = (denoise + encode) / CPU_FLOPS
    placements.append(
        Placement(
            label=f"{DTYPE_LABELS[cpu_dtype]} on the CPU",
            cpu=sum(m.weights for m in on_cpu.values()),
            cost=cpu_seconds,
            settings={"device": "cpu", "offload": "none", "quantize": "none"},
            cpu_fallback=True,
            note=f"on the CPU an edit takes ~{cpu_seconds / 60:.0f} min",
        )
    )
    weights = t.weights + encoders + vae.weights
    return [Part(name="flux", title="FLUX.1 Fill", weights=weights, options=placements)]
