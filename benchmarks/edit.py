"""Seconds per edit and peak memory: the stock FluxFillPipeline call vs our sampler and its fast paths.

Variants, each on the same diptych, prompt and seed, measured in one run:
- `baseline`: `FluxFillPipeline.__call__` as the official ICEdit code calls it;
- `ours`: our sampler (prompt and mask encoded once, our Euler loop, no host syncs);
- `ours+fused-qkv`: with the transformer's Q/K/V projections fused;
- `ours+compile`: with `torch.compile` on the transformer (`--compile`; slow to compile on a CPU);
- `ours+int8` / `ours+fp8`: torchao weight-only quantization (fp8 on CUDA compute 8.9+ only);
- `offload-model` / `offload-sequential`: diffusers CPU offload (CUDA only).

On a CPU the transformer is a scaled-down FLUX (same channels, VAE and packing; fewer and narrower
blocks) and the sources are 512 wide and 256/512/768 tall, so the table shows how time grows with
tokens. On CUDA (`--full`) it is the real FLUX.1 Fill architecture (19 + 38 blocks, dim 3072) with
random weights at a 512x768 source (1024x768 diptych), 28 steps.

    python benchmarks/edit.py --quick
    python benchmarks/edit.py --full --compile          # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import time
from collections.abc import Callable

import torch
from PIL import Image

import prompts
from plugins.icedit.diptych import make_diptych
from plugins.icedit.presets import build_tiny
from plugins.icedit.sampler import FillSampler

FLUX_FILL = {  # black-forest-labs/FLUX.1-Fill-dev transformer/config.json
    "patch_size": 1, "in_channels": 384, "out_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
SCALED = FLUX_FILL | {"num_layers": 2, "num_single_layers": 4, "num_attention_heads": 4, "attention_head_dim": 64,
                      "axes_dims_rope": (16, 24, 24), "joint_attention_dim": 32, "pooled_projection_dim": 32}


def build(full: bool, device: str, dtype: torch.dtype):
    """The tiny pipeline's VAE and prompt encoders around a FLUX-shaped transformer (random weights)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    pipe = build_tiny()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            pipe.transformer = FluxTransformer2DModel(**(FLUX_FILL if full else SCALED)).eval()
            if full:  # prompt encoders with the real widths (pooled 768, joint 4096), one layer each
                pipe.text_encoder = CLIPTextModel(CLIPTextConfig(
                    vocab_size=len(pipe.tokenizer), hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                    bos_token_id=pipe.tokenizer.bos_token_id, eos_token_id=pipe.tokenizer.eos_token_id,
                    pad_token_id=pipe.tokenizer.pad_token_id)).eval()
                pipe.text_encoder_2 = T5EncoderModel(T5Config(
                    vocab_size=len(pipe.tokenizer_2), d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=8,
                    feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)).eval()
    finally:
        torch.set_default_dtype(previous)
    return pipe.to(device=device, dtype=dtype)


def peak_memory(device: str) -> float:
    """GiB: CUDA's allocator peak, or the process's resident high-water mark on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(fn: Callable[[], None], device: str, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (and compile)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, peak_memory(device)


def variants(args, device: str, dtype: torch.dtype):
    """(name, make pipeline, edit function) for every variant this machine can run."""
    out = []

    def ours(pipe, canvas, mask, prompt):
        sampler = FillSampler(pipe)
        cond = sampler.prepare(canvas, mask, prompt, args.steps, 50.0)
        sampler.decode(cond, sampler.denoise(cond, sampler.start(cond, [0]), args.steps).x)

    def stock(pipe, canvas, mask, prompt):
        pipe(prompt=prompt, image=canvas, mask_image=mask, height=canvas.height, width=canvas.width,
             guidance_scale=50.0, num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(0))

    def fused(pipe):
        pipe.transformer.fuse_qkv_projections()
        return pipe

    def compiled(pipe):
        pipe.transformer.compile(dynamic=False)
        return pipe

    def quantized(mode):
        def apply(pipe):
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

            quantize_(pipe.transformer, Float8WeightOnlyConfig() if mode == "fp8" else Int8WeightOnlyConfig())
            return pipe

        return apply

    def offloaded(mode):
        def apply(pipe):
            pipe.to("cpu")
            getattr(pipe, f"enable_{mode}_cpu_offload")(device=device)
            return pipe

        return apply

    out += [("baseline", None, stock), ("ours", None, ours), ("ours+fused-qkv", fused, ours)]
    if args.compile:
        out.append(("ours+compile", compiled, ours))
    try:
        import torchao  # noqa: F401

        out.append(("ours+int8", quantized("int8"), ours))
        if device.startswith("cuda") and torch.cuda.get_device_capability() >= (8, 9):
            out.append(("ours+fp8", quantized("fp8"), ours))
    except ImportError:
        pass
    if device.startswith("cuda"):
        out += [("offload-model", offloaded("model"), ours), ("offload-sequential", offloaded("sequential"), ours)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, two sizes, one repeat")
    parser.add_argument("--full", action="store_true", help="the real FLUX.1 Fill architecture (needs a GPU)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.full and device == "cpu":
        parser.error("--full needs a CUDA GPU (a 12B-parameter transformer)")
    if args.quick:
        args.steps, args.repeats = 4, 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    heights = [768] if args.full else ([256, 512] if args.quick else [256, 512, 768])
    base = build(args.full, device, dtype)
    prompt = prompts.render("ic_edit.txt", instruction="make it look like winter")
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"{'full FLUX.1 Fill' if args.full else 'scaled-down FLUX'} transformer, random weights, {args.steps} "
          f"steps, {dtype}, {where}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<20} {'source':>8} {'tokens':>6} {'s/edit':>8} {'peak GiB':>9} {'vs baseline':>11}")
    ratios = []
    for height in heights:
        source = Image.new("RGB", (512, height), (120, 140, 160))
        canvas, mask = make_diptych(source)
        tokens = (canvas.width // 16) * (canvas.height // 16)
        baseline = None
        for name, prepare, edit in variants(args, device, dtype):
            pipe = prepare(copy.deepcopy(base)) if prepare else base
            with torch.no_grad():
                seconds, peak = measure(
                    lambda p=pipe, e=edit, c=canvas, m=mask: e(p, c, m, prompt), device, args.repeats
                )
            baseline = baseline or seconds
            if name == "ours":
                ratios.append(baseline / seconds)
            print(f"{name:<20} {f'512x{height}':>8} {tokens:>6} {seconds:>8.3f} {peak:>9.2f} "
                  f"{baseline / seconds:>10.2f}x")
    print(f"speedup {sum(ratios) / len(ratios):.2f}")


if __name__ == "__main__":
    main()
