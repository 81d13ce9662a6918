"""Trains the `toy` preset's FLUX Fill pipeline from scratch on the shapes world (`world`) and saves it.

    python plugins/icedit/toy/make_toy.py OUT [--seed 0] [--threads 1]

With the defaults this makes `plugins/icedit/toy/weights/` (copy OUT/pipeline there) in under an hour
on one core; `toy.json` beside the weights records the arguments, the losses and the time each phase
took.

The pipeline is a stock `diffusers.FluxFillPipeline`: the tiny preset's CLIP and tokenizer (`build_tiny()`:
1-layer CLIP that only sees the constant prompt prefix), a 1-layer T5 whose tokenizer has a piece for
every word of the IC prompt and the world's grammar (`word_t5`: ~32 tokens a prompt, not ~125
characters), a small `AutoencoderKL` and a small `FluxTransformer2DModel`, all trained here but CLIP.
Three phases, all seeded, on freshly drawn world edits every step (nothing is seen twice):

1. VAE (factor 4, `VAE_CHANNELS`): reconstruction (L1 + MSE of a posterior sample) + a tiny KL, on
   diptych canvases as the engine makes them ([source | target] and [source | grey masked half]),
   every ResNet block starting as the identity (`zero_residuals`); then frozen, and its
   `scaling_factor` / `shift_factor` set so the scaled latents have zero mean and unit variance.
2. Transformer, adaLN-Zero initialised (`adaln_zero`), and the tiny T5 encoder (`--no-train-t5`
   keeps it frozen-random); CLIP stays frozen. The project's own flow matching
   (`plugins.icedit.train.encode` and `flow_matching_loss`) on training diptychs
   (`plugins.icedit.data.training_diptych`) of IC prompts (`prompts/ic_edit.txt`). Three settings
   differ from fine-tuning, and each was needed:
   - the loss on the right half only (`--loss-region right`): the left half is given, and a model
     trained from scratch on the whole canvas spends itself denoising it;
   - sigmas shifted towards the noise end (`--sigma-shift 4`): only near sigma = 1 must the model
     carry the left panel over to the right, which the logit-normal draw alone rarely asks; without
     it the model learned local denoising and its edits lost the layout;
   - the edited object's tokens weigh 1 + 4 in that loss (`--changed-weight`, `changed_tokens`): the
     right half is mostly a copy, and with every token weighed alike the model learned the copy and
     the backgrounds but left most shapes in their old colour (of the held-out shape edits, 40% hit
     at step 4500 and 37% at step 6000 of an unweighted run; 30% at step 1500 and 58% at step 3000
     of the weighted one).
     Weighing the other shapes' tokens up as well (`--shape-weight`, 0 by default) keeps more of the
     rest but paints fewer shapes, and does not stop the second-shape recolouring it was meant for: with
     4, shapes hit 26% at step 3000, 44% at 4500 and 37% at 6000 (kept 0.91, 0.94, 0.95), and on
     `examples/shapes.png` "make the circle blue" still turned the square blue for 4 seeds of 10. That
     mistake is telling a circle from a square a few tokens wide, not a bias of the loss. Longer
     training did not help either: 13000 steps on 2 threads (47 min) ended at a 78% hit (shapes 67%),
     kept 0.94, and the square blue for 7 seeds of 10; the shipped 8500 steps hit 81%.
3. Save: `pipe.save_pretrained(out, safe_serialization=True)` plus `toy.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import prompts
from plugins.icedit.data import training_diptych
from plugins.icedit.sampler import FillSampler, PromptCache
from plugins.icedit.toy import world
from plugins.icedit.train import encode, flow_matching_loss

MAX_SEQUENCE_LENGTH = 40
"""T5 tokens per prompt: the IC prompt with the longest instruction of the grammar is 125."""
SAMPLER_STEPS = 20

VAE_CHANNELS = (16, 32, 64)
"""Block widths of the VAE: 3 blocks, a factor 4, so a 64-pixel panel is 8x8 tokens after FLUX's 2x2
packing (FLUX's factor 8 would give 4x4 tokens, each 16 pixels: too coarse to tell a shape's outline)."""


def vae_factor(channels: tuple[int, ...]) -> int:
    """Pixels a latent spans: each VAE block but the last halves the picture."""
    return 2 ** (len(channels) - 1)


def vae_config(channels: tuple[int, ...]) -> dict:
    return {
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "block_out_channels": channels,
        "layers_per_block": 1,
        "latent_channels": 16,
        # One group: GroupNorm with few channels per group erases a flat region's absolute colour (this
        # world is mostly flat colour); with 8 groups the VAE still mixed up colours after 400 steps.
        "norm_num_groups": 1,
        "sample_size": world.PANEL,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,  # local: each panel's latents depend on that panel (and the seam)
    }


def transformer_config(channels: tuple[int, ...]) -> dict:
    latent, scale = 16, vae_factor(channels)
    return {
        "patch_size": 1,
        "in_channels": 8 * latent + 4 * scale * scale,  # noisy latents, masked-image latents, packed mask
        "out_channels": 4 * latent,
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "joint_attention_dim": 32,  # the tiny T5's d_model
        "pooled_projection_dim": 32,  # the tiny CLIP's projection
        "guidance_embeds": False,
        "axes_dims_rope": (8, 12, 12),
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_rng(seed: int, phase: int, step: int) -> np.random.Generator:
    """The world's draws of one step: a pure function of (seed, phase, step)."""
    return np.random.default_rng(np.random.SeedSequence([seed, phase, step]))


def torch_generator(seed: int, phase: int, step: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, phase, step, 1]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to `floor` x peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> [B, 3, H, W] in [-1, 1] (the pipeline's image_processor convention)."""
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def vae_batch(rng: np.random.Generator, size: int) -> torch.Tensor:
    """Canvases the VAE meets in the engine: half [source | target], half [source | masked grey]."""
    canvases = []
    for i in range(size):
        edit = world.random_edit(rng, "train")
        canvas, mask, wanted = training_diptych(edit.source.render(), edit.target.render(), world.PANEL)
        canvases.append(wanted if i % 2 == 0 else _masked(canvas))
    return to_tensor(canvases)


def _masked(canvas):
    """The right half grey, as `FillSampler.prepare` feeds it (image * (1 - mask), 0 in [-1, 1])."""
    from PIL import Image

    out = canvas.copy()
    out.paste(Image.new("RGB", (world.PANEL, canvas.height), (128, 128, 128)), (world.PANEL, 0))
    return out


def zero_residuals(model) -> None:
    """Zero the last conv of every ResNet block: each starts as the identity, so the untrained VAE is a
    shallow near-linear chain (conv_in, resampling convs, norm_out, conv_out) and learns colours in
    minutes instead of hours."""
    from diffusers.models.resnet import ResnetBlock2D

    for block in model.modules():
        if isinstance(block, ResnetBlock2D):
            torch.nn.init.zeros_(block.conv2.weight)
            torch.nn.init.zeros_(block.conv2.bias)


def adaln_zero(transformer) -> None:
    """DiT's adaLN-Zero: every modulation (shift, scale, gate) and the output projection start at zero,
    so each block starts as the identity and the model's first output is 0. Diffusers' FLUX blocks are
    built with random modulations (fine for fine-tuning, slow from scratch)."""
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
    )

    for module in transformer.modules():
        if isinstance(module, (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)):
            torch.nn.init.zeros_(module.linear.weight)
            torch.nn.init.zeros_(module.linear.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


def train_vae(vae, args) -> dict:
    zero_residuals(vae)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    losses = []
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
        x = vae_batch(step_rng(args.seed, 1, step), args.vae_batch)
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator=torch_generator(args.seed, 1, step))
        y = vae.decode(z).sample
        rec = F.l1_loss(y, x) + F.mse_loss(y, x)
        kl = dist.kl().mean() / z[0].numel()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(rec.item())
        if (step + 1) % 50 == 0:
            log(f"vae {step + 1}/{args.vae_steps} rec {np.mean(losses[-50:]):.4f} kl/elem {kl.item():.3f}")
    vae.eval().requires_grad_(False)
    return {"rec_first": float(np.mean(losses[:50])), "rec_last": float(np.mean(losses[-50:]))}


@torch.no_grad()
def calibrate(vae, args) -> dict:
    """shift = latent mean, scale = 1 / latent std over fresh canvases (means of the posterior)."""
    means, stds, errors = [], [], []
    for k in range(4):
        x = vae_batch(step_rng(args.seed, 2, k), 32)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        errors.append((vae.decode(dist.mean).sample - x).abs().mean().item() / 2)
    z = torch.cat(means)
    shift, std = z.mean().item(), z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1 / std)
    return {
        "shift_factor": shift,
        "scaling_factor": 1 / std,
        "posterior_std_over_latent_std": torch.cat(stds).mean().item() / std,
        "reconstruction_l1": float(np.mean(errors)),
    }


def build(args):
    """The pipeline: tiny preset's prompt side and scheduler, new VAE and transformer (seeded)."""
    from diffusers import AutoencoderKL, FluxFillPipeline, FluxTransformer2DModel

    from plugins.icedit.presets import build_tiny

    tiny = build_tiny()
    torch.manual_seed(args.seed)
    tokenizer_2, text_encoder_2 = word_t5(tiny)
    vae = AutoencoderKL(**vae_config(args.vae_channels), scaling_factor=1.0, shift_factor=0.0)
    transformer = FluxTransformer2DModel(**transformer_config(args.vae_channels))
    pipe = FluxFillPipeline(
        scheduler=tiny.scheduler,
        vae=vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def word_t5(tiny):
    """The tiny T5 with whole-word pieces for the words of the IC prompt and the world's grammar: a prompt
    is ~31 tokens instead of ~125 characters, so most of each step's work is the picture's."""
    import string

    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = set()
    for ins in world.instructions():
        words |= set(
            prompts.render("ic_edit.txt", instruction=ins).replace(",", " ").replace(".", " ").split()
        )
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces += [("▁" + c, -2.5), (c, -3.0)]
    pieces += [("▁" + w, -1.0) for w in sorted(words)]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    config = tiny.text_encoder_2.config.to_dict() | {"vocab_size": len(tokenizer)}
    return tokenizer, T5EncoderModel(T5Config(**config)).eval()


def t5_ids(pipe, prompt_list: list[str]) -> torch.Tensor:
    """T5 token ids as `FluxFillPipeline._get_t5_prompt_embeds` makes them (padded to max length)."""
    return pipe.tokenizer_2(
        prompt_list,
        padding="max_length",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def token_weights(
    edits: list[world.Edit], channels: tuple[int, ...], changed: float, shapes: float
) -> torch.Tensor:
    """[B, tokens] loss weights: 1 + `changed` on the tokens of the right half whose pixels the edit
    changes (the edited object), 1 + `shapes` on the other tokens that cover a shape of the target, 1
    elsewhere (the left half and the background). A FLUX token is 2x2 latents: 2·factor pixels square.

    Weighing the edited object up puts the recolouring, a few tokens of a picture otherwise copied, in
    the gradient; the other shapes' weight was tried against recolouring a second shape by mistake (the
    module's docstring gives what it did)."""
    side = 2 * vae_factor(channels)
    rows = []
    for edit in edits:
        source, target = (np.asarray(s.render(), np.int16) for s in (edit.source, edit.target))
        background = np.asarray(world.PALETTE[edit.target.background], np.int16)
        per_pixel = {
            "changed": np.abs(target - source).sum(-1) > 0,
            "shape": np.abs(target - background).sum(-1) > 0,
        }
        h, w = world.PANEL // side, world.PANEL // side
        tok = {k: v.reshape(h, side, w, side).any(axis=(1, 3)) for k, v in per_pixel.items()}
        right = 1 + np.where(tok["changed"], changed, np.where(tok["shape"], shapes, 0.0))
        rows.append(np.concatenate([np.ones_like(right), right], axis=1).reshape(-1))
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def train_transformer(pipe, args) -> dict:
    transformer, t5 = pipe.transformer, pipe.text_encoder_2
    adaln_zero(transformer)
    params = list(transformer.parameters())
    transformer.train().requires_grad_(True)
    pipe.text_encoder.requires_grad_(False)
    t5.eval()  # no dropout; trained (or not) with gradients below
    t5.requires_grad_(args.train_t5)
    if args.train_t5:
        params += list(t5.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    sampler = FillSampler(pipe, PromptCache(size=256, max_sequence_length=MAX_SEQUENCE_LENGTH))
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        rng = step_rng(args.seed, 3, step)
        edits = [world.random_edit(rng, "train") for _ in range(args.batch)]
        batch = []
        for edit in edits:
            canvas, mask, target = training_diptych(edit.source.render(), edit.target.render(), world.PANEL)
            batch.append({"canvas": canvas, "mask": mask, "target": target, "instruction": edit.instruction})
        inputs = encode(sampler, batch, 1.0)
        inputs["token_mask"] = inputs["token_mask"] * token_weights(
            edits, args.vae_channels, args.changed_weight, args.shape_weight
        )
        if args.train_t5:  # the same embeddings encode() took from the cache, now with gradients
            ic = [prompts.render("ic_edit.txt", instruction=ex["instruction"]) for ex in batch]
            inputs["prompt_embeds"] = t5(t5_ids(pipe, ic))[0]
        loss = flow_matching_loss(
            transformer,
            inputs,
            torch_generator(args.seed, 3, step),
            None,
            args.loss_region,
            args.sigma_shift,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            rate = (time.perf_counter() - start) / (step + 1)
            log(
                f"dit {step + 1}/{args.steps} loss {np.mean(losses[-args.log_every :]):.4f} lr {lr:.2e} {rate:.2f}s/step"
            )
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save(pipe, args.out / f"step-{step + 1}", args, {"step": step + 1})
            transformer.train()
    transformer.eval().requires_grad_(False)
    t5.requires_grad_(False)
    window = max(1, len(losses) // 10)
    return {"loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:]))}


def save(pipe, out: Path, args, report: dict) -> dict:
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.storage]
    pipe.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    toy = {
        "panel_width": world.PANEL,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "sampler_steps": SAMPLER_STEPS,
        "guidance": 1.0,
        "storage": args.storage,
        "args": vars(args) | {"out": str(args.out)},
        "report": report,
    }
    (out / "toy.json").write_text(json.dumps(toy, indent=2) + "\n")
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*.safetensors")}
    return {"bytes_total": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()), "weights": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=8500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--loss-region", choices=("full", "right"), default="right")
    parser.add_argument("--sigma-shift", type=float, default=4.0)
    parser.add_argument(
        "--changed-weight", type=float, default=4.0, help="extra loss weight of the edited object's tokens"
    )
    parser.add_argument(
        "--shape-weight", type=float, default=0.0, help="extra loss weight of the other shapes' tokens"
    )
    parser.add_argument(
        "--vae-channels", type=lambda v: tuple(int(c) for c in v.split(",")), default=VAE_CHANNELS
    )
    parser.add_argument("--save-every", type=int, default=0, help="also save the pipeline every N steps")
    parser.add_argument("--train-t5", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--storage", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--vae-only", action="store_true")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--vae-from", default=None, help="load the VAE from this folder instead of training it"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    _quiet()
    args.out.mkdir(parents=True, exist_ok=True)
    report, t0 = {}, time.perf_counter()
    pipe = build(args)

    t = time.perf_counter()
    if args.vae_from:  # pilots: reuse a VAE phase already run (its folder from --vae-only)
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(args.vae_from).eval().requires_grad_(False)
        report["vae"] = {"from": str(args.vae_from)}
    else:
        report["vae"] = train_vae(pipe.vae, args)
        report["vae"] |= calibrate(pipe.vae, args)
        pipe.vae.save_pretrained(args.out / "vae")
    report["vae"]["seconds"] = time.perf_counter() - t
    log(f"vae done: {report['vae']}")
    _vae_strip(pipe, args.out / "vae.png")
    if args.vae_only:
        return

    t = time.perf_counter()
    report["transformer"] = train_transformer(pipe, args)
    report["transformer"]["seconds"] = time.perf_counter() - t
    report["total_seconds"] = time.perf_counter() - t0
    log(f"transformer done: {report['transformer']}")
    report["saved"] = save(pipe, args.out / "pipeline", args, report)
    log(f"saved: {report['saved']}")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def _quiet() -> None:
    """No CLIP truncation warnings: the IC prompt is longer than CLIP's 77 tokens, by design."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


@torch.no_grad()
def _vae_strip(pipe, path: Path) -> None:
    """Originals over reconstructions (posterior means) of 8 fresh canvases."""
    from PIL import Image

    x = vae_batch(np.random.default_rng(7), 8)
    y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    ims = [
        ((t.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8) for t in torch.cat([x, y])
    ]
    sheet = Image.new("RGB", (4 * 130, 4 * 66), (128, 128, 128))
    for i, im in enumerate(ims):
        r, c = divmod(i, 4)
        sheet.paste(Image.fromarray(im), (c * 130, r * 66))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(path)


if __name__ == "__main__":
    main()
