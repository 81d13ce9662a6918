"""Seconds per edit and peak memory: the official ICEdit call vs our sampler and its fast paths.

Every variant carries the same random LoRA-MoE adapter in the published layout (4 experts of rank
32 on ff.net.2 / proj_out, plain rank-32 LoRA elsewhere) and edits the same diptych with the same
prompt and seed, in one run:
- `baseline`: `FluxFillPipeline.__call__` as the official ICEdit code calls it, its MoE layers
  computed as the reference does (every expert on every token, `benchmarks/moe.py`);
- `ours`: our sampler (prompt and mask encoded once, our Euler loop, no host syncs) and our
  LoRA-MoE layer, as `icedit edit` runs them;
- `ours+merged`: the plain LoRA merged into the base weights (peft `merge`), MoE layers as they are;
- `ours+merged+fused-qkv`: then the Q/K/V projections fused (merging comes first: diffusers fuses
  the base weights only, so fusing an unmerged model silently drops the LoRA on to_q/to_k/to_v);
- `ours+compile`: `torch.compile` on the transformer (`--compile`; slow to compile on a CPU);
- `ours+int8` / `ours+fp8`: `--quantize`, torchao weight-only (fp8 on CUDA compute 8.9+ only);
- `offload-encoders`, `ours+fp8+offload-encoders`: `--offload encoders` (CUDA only): the prompt
  encoders stay on the CPU and run there, the transformer and the VAE stay on the GPU;
- `offload-model` / `offload-sequential`: `--offload` (CUDA only; sequential streams every layer
  from the CPU at every step, minutes per full-size edit, so it runs only when `--only` names it).

Every edit encodes its prompt again, as a new instruction does (the engine caches repeated
prompts; these figures do not count on that), so `offload-encoders` includes a T5-XXL run on the CPU.

`max |diff|` is the largest difference from the baseline's picture, in 8-bit levels. Peak memory
is CUDA's allocator peak during the timed runs. On a CPU it is the process's resident peak during
the timed runs (Linux's VmHWM, reset after the warm-up), so it also holds the CPU master below.
On a CPU the transformer is a scaled-down FLUX (same channels, VAE and packing; fewer and narrower
blocks) and the sources are 512 wide and 256/512/768 tall, so the table shows how time grows with
tokens. On CUDA (`--full`) it is the real FLUX.1 Fill architecture (19 + 38 blocks, dim 3072) and
the real prompt encoders' shapes (CLIP-L, T5-XXL), random weights, at a 512x768 source (1024x768
diptych), 28 steps. Each variant starts from its own copy of a CPU master, so one variant's
weights never count in another's peak.

    python benchmarks/edit.py --quick
    python benchmarks/edit.py --full --compile          # on a GPU
    python benchmarks/edit.py --full --only baseline,ours,offload-model
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from moe import reference_delta
from PIL import Image

import prompts
from plugins.icedit.diptych import make_diptych
from plugins.icedit.loading import place, quantize
from plugins.icedit.moe import LoraMoeLinear
from plugins.icedit.moe_checkpoint import load_lora_moe, synthetic_checkpoint
from plugins.icedit.presets import CLIP_L_TEXT, FLUX_FILL_TRANSFORMER, T5_XXL_ENCODER, build_tiny
from plugins.icedit.sampler import FillSampler

SCALED = FLUX_FILL_TRANSFORMER | {
    "num_layers": 2,
    "num_single_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "axes_dims_rope": (16, 24, 24),
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
}


def build(full: bool, device: str, dtype: torch.dtype):
    """A CPU master: the tiny pipeline's VAE and prompt encoders around a FLUX-shaped transformer
    with a random LoRA-MoE adapter (random weights, built on `device` because that is faster)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    pipe = build_tiny()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            pipe.transformer = FluxTransformer2DModel(**(FLUX_FILL_TRANSFORMER if full else SCALED)).eval()
            if full:  # the real prompt encoders' shapes: CLIP ViT-L/14's text tower, T5-XXL's encoder (4.8B)
                pipe.text_encoder = CLIPTextModel(
                    CLIPTextConfig(
                        **CLIP_L_TEXT,
                        bos_token_id=pipe.tokenizer.bos_token_id,
                        eos_token_id=pipe.tokenizer.eos_token_id,
                        pad_token_id=pipe.tokenizer.pad_token_id,
                    )
                ).eval()
                pipe.text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL_ENCODER)).eval()
    finally:
        torch.set_default_dtype(previous)
    pipe = pipe.to(device=device, dtype=dtype)
    load_lora_moe(
        pipe.transformer, synthetic_checkpoint(pipe.transformer, num_experts=4, rank=32, scale=0.01)
    )
    return pipe.to("cpu")


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the resident peak starts again from now


def peak_memory(device: str) -> float:
    """GiB since the last reset: CUDA's allocator peak, or the process's resident peak on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 2**20


def measure(fn: Callable[[], Image.Image], device: str, repeats: int) -> tuple[float, float, Image.Image]:
    image = fn()  # warm-up (and compile)
    reset_peak_memory(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, peak_memory(device), image


def reference_moe(pipe):
    """The MoE layers computed the reference's way: every expert on every token."""
    for layer in pipe.transformer.modules():
        if isinstance(layer, LoraMoeLinear):
            layer.delta = functools.partial(reference_delta, layer)
    return pipe


def merged(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in pipe.transformer.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    return pipe


def variants(args, device: str) -> list[tuple[str, list[Callable], Callable]]:
    """(name, steps that prepare a CPU copy for the device, edit function) for every variant this machine can run."""

    def ours(pipe, canvas, mask, prompt):
        sampler = FillSampler(pipe)
        cond = sampler.prepare(canvas, mask, prompt, args.steps, 50.0)
        return sampler.decode(cond, sampler.denoise(cond, sampler.start(cond, [0]), args.steps).x)[0]

    def stock(pipe, canvas, mask, prompt):
        return pipe(
            prompt=prompt,
            image=canvas,
            mask_image=mask,
            height=canvas.height,
            width=canvas.width,
            guidance_scale=50.0,
            num_inference_steps=args.steps,
            generator=torch.Generator("cpu").manual_seed(0),
        ).images[0]

    def fused(pipe):
        pipe.transformer.fuse_qkv_projections()
        return pipe

    def compiled(pipe):
        pipe.transformer.compile(dynamic=False)
        return pipe

    def quantized(mode):
        return lambda pipe: quantize(pipe.transformer, mode, device) or pipe

    def placed(offload):
        return lambda pipe: place(pipe, device, offload) or pipe

    to_device = placed("none")

    out = [
        ("baseline", [to_device, reference_moe], stock),
        ("ours", [to_device], ours),
        ("ours+merged", [merged, to_device], ours),
        ("ours+merged+fused-qkv", [merged, fused, to_device], ours),
    ]
    if args.compile:
        out.append(("ours+compile", [to_device, compiled], ours))
    try:
        import torchao  # noqa: F401

        out.append(("ours+int8", [quantized("int8"), to_device], ours))
        if device.startswith("cuda") and torch.cuda.get_device_capability() >= (8, 9):
            out.append(("ours+fp8", [quantized("fp8"), to_device], ours))
            out.append(("ours+fp8+offload-encoders", [quantized("fp8"), placed("encoders")], ours))
    except ImportError:
        pass
    if device.startswith("cuda"):
        out.append(("offload-encoders", [placed("encoders")], ours))
        out.append(("offload-model", [placed("model")], ours))
        if args.only and "offload-sequential" in args.only:
            out.append(("offload-sequential", [placed("sequential")], ours))
    if args.only:
        out = [v for v in out if v[0] in args.only or v[0] == "baseline"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, two sizes, best of two")
    parser.add_argument("--full", action="store_true", help="the real FLUX.1 Fill architecture (needs a GPU)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    parser.add_argument(
        "--only", type=lambda s: s.split(","), help="comma-separated variants (baseline always runs)"
    )
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.full and device == "cpu":
        parser.error("--full needs a CUDA GPU (a 12B-parameter transformer)")
    if args.quick:
        args.steps, args.repeats = 4, 2
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    heights = [768] if args.full else ([256, 512] if args.quick else [256, 512, 768])
    master = build(args.full, device, dtype)
    prompt = prompts.render("ic_edit.txt", instruction="make it look like winter")
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(
        f"{'full FLUX.1 Fill' if args.full else 'scaled-down FLUX'} transformer + random LoRA-MoE, random weights, "
        f"{args.steps} steps, {dtype}, {where}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'variant':<22} {'source':>8} {'tokens':>6} {'s/edit':>8} {'peak GiB':>9} {'vs baseline':>11} "
        f"{'max |diff|':>10}"
    )
    ratios = []
    for height in heights:
        source = Image.new("RGB", (512, height), (120, 140, 160))
        canvas, mask = make_diptych(source)
        tokens = (canvas.width // 16) * (canvas.height // 16)
        baseline = None
        for name, prepare, edit in variants(args, device):
            pipe = copy.deepcopy(master)
            for step in prepare:
                pipe = step(pipe)
            with torch.no_grad():
                seconds, peak, image = measure(
                    lambda p=pipe, e=edit, c=canvas, m=mask: e(p, c, m, prompt), device, args.repeats
                )
            del pipe
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            baseline = baseline or (seconds, np.asarray(image, dtype=np.int16))
            diff = np.abs(np.asarray(image, dtype=np.int16) - baseline[1]).max()
            if name == "ours":
                ratios.append(baseline[0] / seconds)
            print(
                f"{name:<22} {f'512x{height}':>8} {tokens:>6} {seconds:>8.3f} {peak:>9.2f} "
                f"{baseline[0] / seconds:>10.2f}x {diff:>10}"
            )
    if ratios:  # `--only` without `ours` compares nothing to the baseline
        print(f"speedup {sum(ratios) / len(ratios):.2f}")


if __name__ == "__main__":
    main()
