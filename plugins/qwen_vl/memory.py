"""What the Qwen2.5-VL rewriter and judge hold in memory, on the GPU or on the CPU (`vlm_device`).

The size comes from the real architecture, built on the meta device from the published config.json (or
the local folder's own) and counted once per process; the working memory from the image and prompt
tokens a rewrite or a judgement runs on, with constants measured on a CPU (torch.profiler's
live-allocation peak of one layer) for the GPU kit to check against CUDA's peaks.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from assistant import hub
from assistant.memory import CPU_BYTES_PER_S, CPU_FLOPS, GPU_BYTES_PER_S, GPU_FLOPS, Part, Placement
from assistant.settings import Settings
from plugins.qwen_vl.options import QwenVlOptions

_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}
_TEXT = {
    "model_type": "qwen2_5_vl",
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
CONFIGS = {  # the published config.json of each, less token ids and the like
    "Qwen/Qwen2.5-VL-7B-Instruct": _TEXT
    | {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "vision_config": _VISION | {"out_hidden_size": 3584},
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": _TEXT
    | {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "vision_config": _VISION | {"out_hidden_size": 2048},
    },
}
SMALLER = {"Qwen/Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-3B-Instruct"}
"""What to suggest when a model does not fit on the GPU."""

PIXELS_PER_TOKEN = 28 * 28
"""One image token per 28x28 pixels: 14x14 patches, merged 2x2 (so four patches per token)."""
REWRITE_PROMPT_TOKENS = 800
"""The rewriter's text around its one image: prompts/rewrite.md (~600 tokens), recent turns, the request."""
JUDGE_PROMPT_TOKENS = 150
"""The judge's text around its three images (source, A, B): prompts/judge_pairwise.md and the instruction."""
ANSWER_TOKENS = 96
"""A typical rewrite answer (a JSON plan); memory is planned for `vlm_max_new_tokens`, time for this."""
TEXT_INTER_WIDTHS, TEXT_HIDDEN_WIDTHS = 3.0, 5.0
"""The decoder's peak per token, in tensors of the MLP's and the residual's widths (gate, up and their
product; hidden states, norms, attention), SDPA materialising no attention matrix: 3.0 x 18944 + 5.0 x
3584 = 74.7k elements per token against 68.9k measured on one 7B layer, in fp32 and in bf16 alike."""
VISION_INTER_WIDTHS, VISION_HIDDEN_WIDTHS = 3.0, 9.5
"""The vision tower's peak per patch, in tensors of its MLP's (3420) and residual's (1280) widths:
3.0 x 3420 + 9.5 x 1280 = 22.4k elements against 22.1k measured on one block in bf16 (its RMSNorm and
rotary embedding work in fp32) and 14.3k in fp32."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class VlmSize(BaseModel):
    """A Qwen2.5-VL's counts and the config figures its working memory depends on."""

    params: int
    vision_params: int
    buffers: int
    hidden: int
    intermediate: int
    layers: int
    kv_width: int
    """Key plus value elements per token and layer."""
    vision_hidden: int
    vision_intermediate: int


@cache
def _size(config_json: str) -> VlmSize:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**json.loads(config_json))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    text, vision = config.text_config, config.vision_config
    return VlmSize(
        params=sum(p.numel() for p in model.parameters()),
        vision_params=sum(p.numel() for p in model.model.visual.parameters()),
        buffers=sum(b.numel() for b in model.buffers()),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        kv_width=2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads),
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
    )


def config_of(vlm: str) -> tuple[str, dict[str, Any]]:
    """(title, config.json) of a hub id or local folder: its own config when it is on disk (a folder, or a
    cached hub repo), else the published config of the size its name says (7B unless it says 3B)."""
    folder = (
        Path(vlm).expanduser()
        if hub.is_local(vlm)
        else hub.on_disk(hub.Artifact(role="VLM", ref=vlm, layout="transformers", option="--vlm"))
    )
    if folder is not None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        known = [ref for ref, c in CONFIGS.items() if c["hidden_size"] == config.get("hidden_size")]
        return (_title(known[0]) if known else f"Qwen2.5-VL ({Path(vlm).name})"), config
    ref = next((r for r in CONFIGS if _title(r).lower() in vlm.lower()), "Qwen/Qwen2.5-VL-7B-Instruct")
    return _title(ref), CONFIGS[ref]


def _title(ref: str) -> str:
    return ref.split("/")[-1].removesuffix("-Instruct")


def size(vlm: str) -> VlmSize:
    """The counts of `vlm` (hub id or folder), from its meta build: ~0.6 s, once per config."""
    return _size(json.dumps(config_of(vlm)[1], sort_keys=True))


def _runs(settings: Settings) -> tuple[int, int]:
    """(rewrites, judge matches) per turn: the rewriter once, the judge's early filter M - 1 matches. A
    rewriter not chosen yet (None) is the VLM's with real weights (`preflight.default_rewriter`)."""
    rewrites = int(settings.rewriter in (None, "qwen_vl"))
    matches = settings.candidates - 1 if settings.judge == "qwen_vl" else 0
    return rewrites, matches


def working_memory(s: VlmSize, settings: Settings, options: QwenVlOptions, dtype_bytes: int) -> int:
    """Peak bytes beyond the weights: the larger of the rewrite (one image, the answer's KV cache) and a
    judgement (a batch of both orders, three images each), whichever runs."""
    image = options.max_pixels // PIXELS_PER_TOKEN
    rewrites, matches = _runs(settings)
    runs = [(1, 1, REWRITE_PROMPT_TOKENS + options.vlm_max_new_tokens)] if rewrites else []
    runs += [(2, 3, JUDGE_PROMPT_TOKENS)] if matches else []
    peak = 0
    for batch, images, text in runs:
        tokens = batch * (images * image + text)
        patches = 4 * batch * images * image
        vision = patches * (
            VISION_INTER_WIDTHS * s.vision_intermediate + VISION_HIDDEN_WIDTHS * s.vision_hidden
        )
        decoder = tokens * (TEXT_INTER_WIDTHS * s.intermediate + TEXT_HIDDEN_WIDTHS * s.hidden)
        kv = tokens * s.layers * s.kv_width
        peak = max(peak, int((max(vision, decoder) + kv) * dtype_bytes))
    return peak


def _seconds(
    s: VlmSize, settings: Settings, options: QwenVlOptions, weights: int, flops: float, bandwidth: float
) -> float:
    """A turn's VLM time: prefill FLOPs (2 per parameter and token; the vision tower's per patch), then the
    rewrite's answer, each token reading every weight."""
    image = options.max_pixels // PIXELS_PER_TOKEN
    rewrites, matches = _runs(settings)
    text = s.params - s.vision_params

    def prefill(images: int, prompt: int) -> float:
        return 2 * text * (images * image + prompt) + 2 * s.vision_params * 4 * images * image

    work = rewrites * prefill(1, REWRITE_PROMPT_TOKENS) + matches * 2 * prefill(3, JUDGE_PROMPT_TOKENS)
    return work / flops + rewrites * ANSWER_TOKENS * weights / bandwidth


def _part(vlm: str, settings: Settings, options: QwenVlOptions) -> Part:
    title, _ = config_of(vlm)
    s = size(vlm)
    gpu_dtype = options.vlm_dtype or "bfloat16"  # model.load's defaults
    cpu_dtype = options.vlm_dtype or "float32"
    gpu, cpu = ((s.params + s.buffers) * DTYPE_BYTES[d] for d in (gpu_dtype, cpu_dtype))
    placements = [
        Placement(
            label=f"{DTYPE_LABELS[gpu_dtype]} on the GPU",
            resident_gpu=gpu,
            activation_gpu=working_memory(s, settings, options, DTYPE_BYTES[gpu_dtype]),
            cost=_seconds(s, settings, options, gpu, GPU_FLOPS, GPU_BYTES_PER_S),
            settings={"vlm_device": "cuda"},
        ),
        Placement(
            label=f"{DTYPE_LABELS[cpu_dtype]} on the CPU",
            cpu=cpu,
            cost=_seconds(s, settings, options, cpu, CPU_FLOPS, CPU_BYTES_PER_S),
            settings={"vlm_device": "cpu"},
        ),
    ]
    return Part(name="vlm", title=title, weights=gpu, options=placements)


def parts(settings: Settings, options: QwenVlOptions, scoring: bool = False) -> list[Part]:
    """The configured VLM's placements, with the smaller model as an alternative for the 7B; [] when these
    settings never load it (--vlm none, neither the rewriter nor an early-filter judge is qwen_vl, and it
    scores nothing). Scoring an edit (two short answers) is planned as a rewrite."""
    if scoring:
        settings = settings.model_copy(update={"rewriter": "qwen_vl"})
    if options.vlm == "none" or _runs(settings) == (0, 0):
        return []
    part = _part(options.vlm, settings, options)
    smaller = SMALLER.get(next((r for r in CONFIGS if _title(r) == part.title), ""))
    if smaller:
        part.alternatives = [
            _part(smaller, settings, options).model_copy(update={"switch": {"vlm": smaller}})
        ]
    return [part]
