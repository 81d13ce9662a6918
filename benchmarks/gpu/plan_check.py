"""The memory planner's estimates against measured peaks, one FLUX.1 Fill component at a time.

On a CUDA GPU each component is built at its real shape with random weights (`benchmarks/edit.py`'s
builder: the FLUX.1 Fill transformer with a random LoRA-MoE adapter, CLIP-L, T5-XXL; the VAE from
`presets.FLUX_VAE`), moved to the GPU in bf16 and run once as an edit runs it at the engine's
1024x768 diptych: the transformer one denoising step (3072 image + 512 text tokens), T5 on 512
tokens, CLIP on 77, the VAE encoding the masked canvas and decoding the painted one. Weights are the
allocator's growth when the component moves to the GPU; activation is the allocator's peak during
the forward, above the weights. Each component is freed before the next. On a GPU of compute
capability 8.9 or more (with torchao) the transformer is measured again quantized to fp8, as
`--quantize fp8` runs it. The table sets them beside `plugins.icedit.memory.components(settings)`;
`measured/est.` is weights plus activation, measured over estimated. After it come the peaks
`assistant.memory.plan_memory` plans for FLUX.1 Fill on this GPU in each memory mode that
`benchmarks/edit.py --full` measures, and the plan it makes with the VLM.

`--tiny` runs the same inputs and forwards on the tiny preset on the CPU, without the planner, and
prints each component's parameter and buffer bytes (a CPU has no allocator peak to read).

    python benchmarks/gpu/plan_check.py          # on a GPU
    python benchmarks/gpu/plan_check.py --tiny
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "benchmarks"),
]  # the project, and edit.py's builder with its `moe` import

TEXT_TOKENS = 512  # FluxFillPipeline's max_sequence_length: T5 always runs on 512 tokens
GIB = 2**30
MODES = {  # edit.py's variant: the settings that run it
    "ours": {"offload": "none", "quantize": "none"},
    "offload-encoders": {"offload": "encoders", "quantize": "none"},
    "ours+fp8": {"offload": "none", "quantize": "fp8"},
    "ours+fp8+offload-encoders": {"offload": "encoders", "quantize": "fp8"},
    "offload-model": {"offload": "model", "quantize": "none"},
    "offload-sequential": {"offload": "sequential", "quantize": "none"},
}


def forwards(pipe, device: str, dtype: torch.dtype) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """(component name, one forward as an edit at the engine's 1024x768 diptych runs it)."""
    from plugins.icedit.diptych import make_diptych

    canvas, _ = make_diptych(Image.new("RGB", (512, 768)))
    width, height = canvas.size
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    lat_h, lat_w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))

    def tokens(model, length):
        return torch.randint(0, model.config.vocab_size, (1, length), device=device)

    def transformer():
        config = pipe.transformer.config
        image_tokens = (lat_h // 2) * (lat_w // 2)
        return pipe.transformer(
            hidden_states=torch.randn(1, image_tokens, config.in_channels, device=device, dtype=dtype),
            timestep=torch.ones(1, device=device, dtype=dtype),
            guidance=torch.full([1], 50.0, device=device) if config.guidance_embeds else None,
            pooled_projections=torch.randn(1, config.pooled_projection_dim, device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(
                1, TEXT_TOKENS, config.joint_attention_dim, device=device, dtype=dtype
            ),
            txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype),
            img_ids=pipe._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, device, dtype),
            return_dict=False,
        )[0]

    def vae():  # the masked canvas encoded once, the painted one decoded: the peak is the larger of the two
        masked = pipe.vae.encode(
            torch.randn(1, 3, height, width, device=device, dtype=dtype)
        ).latent_dist.mean
        return pipe.vae.decode(torch.randn_like(masked), return_dict=False)[0]

    return [
        (
            "text_encoder",
            lambda: pipe.text_encoder(tokens(pipe.text_encoder, pipe.tokenizer.model_max_length))[0],
        ),
        ("text_encoder_2", lambda: pipe.text_encoder_2(tokens(pipe.text_encoder_2, TEXT_TOKENS))[0]),
        ("vae", vae),
        ("transformer", transformer),
    ]


def resident_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def measure_on_gpu(move: Callable[[], None], forward: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """(weight bytes, activation bytes): the allocator's growth from `move`, then its peak in `forward` above that."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    move()
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        forward()
    torch.cuda.synchronize()
    return weights, torch.cuda.max_memory_allocated() - base - weights


def tiny() -> None:
    from plugins.icedit.presets import build_tiny

    pipe, dtype = build_tiny(), torch.float32
    print(
        f"tiny preset components, random weights, {dtype} on cpu, torch {torch.__version__}, "
        f"1024x768 diptych, {TEXT_TOKENS} text tokens"
    )
    print(f"{'component':<16} {'parameters':>11} {'bytes':>10}  output")
    for name, forward in forwards(pipe, "cpu", dtype):
        module = getattr(pipe, name)
        with torch.no_grad():
            shape = tuple(forward().shape)
        print(
            f"{name:<16} {sum(p.numel() for p in module.parameters()):>11} {resident_bytes(module):>10}  {shape}"
        )


def on_gpu() -> None:
    try:
        from assistant.memory import gpu_capacity, plan_memory
        from plugins.icedit import memory as icedit_memory
    except ImportError as e:
        sys.exit(
            f"plan_check.py: the memory planner is missing ({e}); it needs assistant.memory "
            "(plan_memory, gpu_capacity) and plugins.icedit.memory"
        )
    from diffusers import AutoencoderKL
    from edit import build

    from assistant import plugins
    from assistant.settings import Settings
    from plugins.icedit.loading import quantize
    from plugins.icedit.presets import FLUX_VAE

    dtype = torch.bfloat16
    settings = Settings(preset="default", device="cuda", dtype="bfloat16")
    options = plugins.options_for("engines", "icedit", settings)
    estimates = icedit_memory.components(settings, options)
    pipe = build(True, "cuda", dtype)
    torch.manual_seed(0)
    pipe.vae = AutoencoderKL(**FLUX_VAE).to(dtype).eval()
    print(
        f"full-size FLUX.1 Fill components, random weights, {dtype} on {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, 1024x768 diptych, {TEXT_TOKENS} text tokens; GiB"
    )
    print(
        "Estimated: plugins.icedit.memory.components with dtype bfloat16, the adapter counted in the "
        "LoRA-MoE layout that edit.py's random adapter has."
    )
    print(
        f"{'component':<18} {'est. weights':>12} {'weights':>8} {'est. activation':>15} {'activation':>10} "
        f"{'measured/est.':>13}"
    )
    fp8 = torch.cuda.get_device_capability() >= (8, 9) and importlib.util.find_spec(
        "torchao"
    )  # --quantize fp8's needs
    measured = []
    for name, forward in forwards(pipe, "cuda", dtype):
        measured.append(name)
        module = getattr(pipe, name)
        print_row(name, estimates.get(name), measure_on_gpu(functools.partial(module.to, "cuda"), forward))
        if name == "transformer" and fp8:
            module.to("cpu")
            quantized = icedit_memory.components(settings, options.model_copy(update={"quantize": "fp8"}))
            print_row(
                "transformer (fp8)",
                quantized.get(name),
                measure_on_gpu(functools.partial(quantize, module, "fp8", "cuda"), forward),
            )
        setattr(pipe, name, None)
        del module
    if missing := sorted(set(estimates) - set(measured)):
        print(f"estimated but not measured here: {', '.join(missing)}")

    gc.collect()
    torch.cuda.empty_cache()
    capacity, capability = gpu_capacity()
    flux = plugins.call("engines", "icedit", "memory", settings)
    print(
        "\nPlanned peaks of FLUX.1 Fill alone on this GPU, beside the `peak GiB` that edit.py --full measures:"
    )
    print(f"{'edit.py variant':<26} {'planned GiB':>11}  placement")
    for variant, forced in MODES.items():
        plan = plan_memory(flux, capacity, forced={"device": "cuda"} | forced, capability=capability)
        print(f"{variant:<26} {gib(plan.estimated_peak):>11}  {plan.choices['flux'].label}")
    plan = plan_memory(
        [*flux, *plugins.call("rewriters", "qwen_vl", "memory", settings)], capacity, capability=capability
    )
    print(f"\nThe plan with the VLM: {plan.explain()}")
    for note in plan.notes:
        print(f"  {note}")


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def print_row(name: str, estimate, measured: tuple[int, int]) -> None:
    """`estimate`: a `plugins.icedit.memory.Component` (weights, activation), or None."""
    est_w, est_a = (estimate.weights, estimate.activation) if estimate else (None, None)
    ratio = f"{sum(measured) / (est_w + est_a):.2f}x" if estimate and est_w + est_a else "-"
    print(
        f"{name:<18} {gib(est_w):>12} {gib(measured[0]):>8} {gib(est_a):>15} {gib(measured[1]):>10} {ratio:>13}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny preset on the CPU: the same inputs and forwards, parameter bytes only",
    )
    args = parser.parse_args()
    if args.tiny:
        tiny()
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; --tiny runs the same measurement code on the tiny preset on the CPU")
    else:
        on_gpu()


if __name__ == "__main__":
    main()
