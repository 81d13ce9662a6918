"""The feature models behind the editing metrics: CLIP (image and text) and a DINO ViT, unit-norm embeddings out.

Both load by hub id or local folder (defaults: the models MagicBrush and Emu Edit report with) through
transformers' PIL image processors, so no torchvision is needed. `tiny()` builds random, seeded
stand-ins in-process for `--preset tiny` and tests: their numbers check the plumbing, not quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from assistant import hub
from assistant.errors import UserError

TINY_SEED = 0
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"


def feature_artifact(ref: str, what: str, option: str) -> hub.Artifact:
    return hub.Artifact(role=f"{what} model", ref=ref, layout="transformers", option=option)


@dataclass(frozen=True)
class FeatureModels:
    clip: Any
    clip_processor: Any
    tokenizer: Any
    dino: Any
    dino_processor: Any
    random_weights: bool = False

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def _pixels(self, processor, images: list[Image.Image]) -> torch.Tensor:
        pixels = processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.clip.dtype)

    @torch.no_grad()
    def clip_images(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=self._pixels(self.clip_processor, images))
        return F.normalize(out.pooler_output.float(), dim=-1)

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.clip.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return F.normalize(out.pooler_output.float(), dim=-1)

    @torch.no_grad()
    def dino_images(self, images: list[Image.Image]) -> torch.Tensor:
        """The CLS token of the last layer, as MagicBrush and Emu Edit compare DINO features."""
        out = self.dino(pixel_values=self._pixels(self.dino_processor, images).to(self.dino.dtype))
        return F.normalize(out.last_hidden_state[:, 0].float(), dim=-1)


def chosen(settings, options) -> tuple[str, str] | None:
    """(CLIP, DINO) hub ids or folders to load; None for random tiny ones: neither named, and the engine's
    `preset` option is `tiny` (random weights: its numbers check the plumbing anyway). An engine without
    presets (an algorithm, an API) is measured with the real models."""
    from assistant import plugins

    tiny = plugins.option("engines", settings.engine, "preset", settings) == "tiny"
    if options.clip_model is None and options.dino_model is None and tiny:
        return None
    return options.clip_model or DEFAULT_CLIP, options.dino_model or DEFAULT_DINO


def artifacts(settings, options) -> list[hub.Artifact]:
    """The feature models' weights the scorer will read."""
    refs = chosen(settings, options)
    if refs is None:
        return []
    return [
        feature_artifact(refs[0], "CLIP", "--clip-model"),
        feature_artifact(refs[1], "DINO", "--dino-model"),
    ]


def load(clip_ref: str, dino_ref: str, device: str | torch.device) -> FeatureModels:
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, ViTImageProcessorPil, ViTModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a weights bar per load is noise in a report
    clip_src = str(hub.locate(feature_artifact(clip_ref, "CLIP", "--clip-model")))
    dino_src = str(hub.locate(feature_artifact(dino_ref, "DINO", "--dino-model")))
    try:
        clip = CLIPModel.from_pretrained(clip_src, use_safetensors=True).eval().to(device)
        clip_processor = CLIPImageProcessorPil.from_pretrained(clip_src)
        tokenizer = AutoTokenizer.from_pretrained(clip_src)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise UserError(f"cannot load the CLIP model from {clip_ref}: {hub.first_line(e)}") from None
    try:
        dino = (
            ViTModel.from_pretrained(dino_src, add_pooling_layer=False, use_safetensors=True)
            .eval()
            .to(device)
        )
        dino_processor = ViTImageProcessorPil.from_pretrained(dino_src)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load the DINO model from {dino_ref}: {hub.first_line(e)}") from None
    return FeatureModels(clip, clip_processor, tokenizer, dino, dino_processor)


def tiny(device: str | torch.device = "cpu") -> FeatureModels:
    """Random CLIP and DINO ViT at toy widths (32x32 inputs), identical on every call."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    side = {"height": 32, "width": 32}
    clip_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=side)
    dino_processor = ViTImageProcessorPil(size=side)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        clip = CLIPModel(
            CLIPConfig(
                text_config={
                    "vocab_size": len(vocab),
                    "hidden_size": 32,
                    "intermediate_size": 37,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 4,
                    "max_position_embeddings": 77,
                    "bos_token_id": tokenizer.bos_token_id,
                    "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id,
                },
                vision_config={
                    "hidden_size": 32,
                    "intermediate_size": 37,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 4,
                    "image_size": 32,
                    "patch_size": 8,
                },
                projection_dim=16,
            )
        )
        dino = ViTModel(
            ViTConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=37,
                image_size=32,
                patch_size=8,
            ),
            add_pooling_layer=False,
        )
    return FeatureModels(
        clip.eval().to(device),
        clip_processor,
        tokenizer,
        dino.eval().to(device),
        dino_processor,
        random_weights=True,
    )
