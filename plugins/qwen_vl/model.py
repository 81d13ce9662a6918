"""The one Qwen2.5-VL a process loads: shared by the rewriter and the judge, loaded on first use.

Its weights are an `Artifact` (`artifact`): the host checks and fetches them before anything loads,
and the loader reads them from disk. Weights are untrusted: safetensors only, no remote code runs
(transformers' default, never overridden), and a hub id can be pinned to a revision
(`--vlm-revision`). What the model cannot take (an image it cannot size, a GPU out of memory) is
one line, not a traceback.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from assistant import hub
from assistant.errors import UserError
from plugins.qwen_vl.options import QwenVlOptions
from plugins.qwen_vl.processor import ImageOnlyProcessor, load_processor
from plugins.qwen_vl.vision import images_of
from plugins.qwen_vl.weights import artifact

NO_VLM_HINT = "--rewriter rules runs without a VLM"
OOM_HINT = "set ICEDIT_VLM_DEVICE=cpu to run it on the CPU, or use --rewriter rules (no VLM)"


@dataclass(frozen=True)
class Vlm:
    """A loaded model and its processor; chat conversations in, text or next-token logits out."""

    model: Any
    processor: ImageOnlyProcessor

    def inputs(self, conversations: list[list[dict[str, Any]]]):
        """Chat template + images of each conversation, left-padded into one batch on the model's device.

        process_vision_info has already sized the images (multiples of 28 within min/max_pixels), so the
        image processor does not resize them again to its own limits.
        """
        texts = [
            self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        try:
            images = images_of(conversations)
        except ValueError as e:  # e.g. "absolute aspect ratio must be smaller than 200"
            raise UserError(f"the VLM cannot take this image: {e}") from None
        batch = self.processor(text=texts, images=images, do_resize=False, padding=True, return_tensors="pt")
        return batch.to(self.model.device)

    def stop_ids(self) -> list[int]:
        """The tokens that end an answer (Qwen2.5-VL-Instruct's <|im_end|> and <|endoftext|>)."""
        found = self.model.generation_config.eos_token_id
        ids = found if isinstance(found, list) else [found]
        return [i for i in ids if i is not None] or [self.processor.tokenizer.eos_token_id]

    @torch.inference_mode()
    def generate(self, conversation: list[dict[str, Any]], max_new_tokens: int, logits_processor=None) -> str:
        """The greedy answer to one conversation, special tokens removed."""
        inputs = self.inputs([conversation])
        try:
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=logits_processor
            )
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory running the VLM on {self.model.device}: {OOM_HINT}") from None
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[
            0
        ]

    @torch.inference_mode()
    def next_token_logits(self, conversations: list[list[dict[str, Any]]]) -> torch.Tensor:
        """[batch, vocab] float32 logits of the first answer token, from one forward pass."""
        inputs = self.inputs(conversations)
        try:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory running the VLM on {self.model.device}: {OOM_HINT}") from None


_lock = threading.Lock()
_loaded: dict[tuple[str, str | None, str, str, str | None], Vlm] = {}


def load(options: QwenVlOptions) -> Vlm:
    """The process's model for (vlm, revision, device, dtype, attention): loaded once, then shared."""
    weights = artifact(options)
    if weights is None:
        raise UserError(f"no VLM: --vlm none was given ({NO_VLM_HINT})")
    device = options.vlm_device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = options.vlm_dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    key = (weights.ref, weights.revision, device, dtype, options.attn_implementation)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(weights, device, dtype, options.attn_implementation)
        return _loaded[key]


def _load(weights: hub.Artifact, device: str, dtype: str, attn_implementation: str | None) -> Vlm:
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a weights bar per load is noise in a chat or a pipe
    folder = str(hub.locate(weights))
    try:
        processor = load_processor(folder)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder,
            dtype=getattr(torch, dtype),
            device_map=device,
            attn_implementation=attn_implementation,
            use_safetensors=True,
        )
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory loading the VLM onto {device}: {OOM_HINT}") from None
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        raise UserError(f"cannot load the VLM from {weights.ref}: {hub.first_line(e)}") from None
    return Vlm(model.eval(), processor)
