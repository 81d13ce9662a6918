"""Engine presets: the real FLUX.1 Fill + ICEdit LoRA (`default`) or LoRA-MoE (`moe`), `tiny`,
random weights built in-process, and `toy`, a small model trained on the shapes world whose weights ship
in this package (`plugins/icedit/toy/make_toy.py` makes them).

`tiny` has the real pipeline's code and geometry (VAE factor 8, 2x2 packing, CLIP + T5 prompt
encoders) at toy widths, so the whole flow runs offline on a CPU in about a second. Its output is
noise: every surface labels it as coming from random weights.
"""

from __future__ import annotations

import string
from pathlib import Path

from pydantic import BaseModel

from assistant.errors import UserError


class Preset(BaseModel):
    name: str
    model: str | None = None
    lora: str | None = None
    random_weights: bool = False
    bundled: bool = False
    """Its weights ship inside this package (`model` is their folder): provenance names the preset."""
    panel_width: int = 512
    """The diptych's panel width the model was trained at (the engine resizes the source to it)."""
    max_sequence_length: int = 512
    """T5 tokens per prompt (FLUX's 512)."""
    description: str


PRESETS = {
    p.name: p
    for p in (
        Preset(
            name="default",
            model="black-forest-labs/FLUX.1-Fill-dev",
            lora="RiverZ/normal-lora",
            description="FLUX.1 Fill dev + ICEdit LoRA (real weights; a GPU with ~24 GB or offload)",
        ),
        Preset(
            name="moe",
            model="black-forest-labs/FLUX.1-Fill-dev",
            lora="sanaka87/ICEdit-MoE-LoRA",
            description="FLUX.1 Fill dev + ICEdit LoRA-MoE, the official demo's default (real weights)",
        ),
        Preset(
            name="tiny",
            random_weights=True,
            description="random-weight tiny FLUX Fill built in-process: runs the whole flow offline in a second",
        ),
        Preset(
            name="toy",
            model=str(Path(__file__).resolve().parent / "toy" / "weights"),
            bundled=True,
            panel_width=64,
            max_sequence_length=40,
            description="a small FLUX Fill trained on a world of coloured shapes (64-px panels, "
            "plugins/icedit/toy): real edits offline in seconds",
        ),
    )
}

TINY_SEED = 0
FLUX_FILL_TRANSFORMER = {  # black-forest-labs/FLUX.1-Fill-dev transformer/config.json: the architecture
    "patch_size": 1,
    "in_channels": 384,
    "out_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""`FluxTransformer2DModel(**FLUX_FILL_TRANSFORMER)` is the real model's shape, with random weights
(the full-size placement test and `benchmarks/edit.py --full`)."""
FLUX_VAE = {  # black-forest-labs/FLUX.1-Fill-dev vae/config.json
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
CLIP_L_TEXT = {  # text_encoder/config.json: CLIP ViT-L/14's text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
T5_XXL_ENCODER = {  # text_encoder_2/config.json: T5 v1.1 XXL, encoder only
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
"""The real VAE and prompt encoders' shapes: `AutoencoderKL(**FLUX_VAE)`,
`CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))`, `T5EncoderModel(T5Config(**T5_XXL_ENCODER))` (the memory
planner's counts, `benchmarks/edit.py --full`)."""


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}' (available: {', '.join(PRESETS)})")
    return PRESETS[name]


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return [chr(c) for c in bs + [256 + n for n in range(len(extra))]]


def build_tiny():
    """The tiny FluxFillPipeline, identical on every call (seeded, without touching global RNG)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    chars = _byte_alphabet()
    clip_vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    clip_vocab |= {"<|startoftext|>": len(clip_vocab), "<|endoftext|>": len(clip_vocab) + 1}
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces += [("▁" + c, -2.5), (c, -3.0)]
    tokenizer_2 = T5TokenizerFast(vocab=pieces, extra_ids=0)

    latent, blocks = 16, 4
    scale = 2 ** (blocks - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=8 * latent + 4 * scale * scale,
            out_channels=4 * latent,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=(8,) * blocks,
            layers_per_block=1,
            latent_channels=latent,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=1,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    for model in (transformer, vae, text_encoder, text_encoder_2):
        model.eval()  # built from configs they start in training mode (T5 dropout)
    pipe = FluxFillPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
