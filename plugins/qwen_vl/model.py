"""The one Qwen2.5-VL a process loads: shared by the rewriter and the judge, loaded on first use.

Weights are untrusted: no remote code runs (transformers' default, never overridden), and a hub id
can be pinned to a revision (`--vlm-revision`). What the model cannot take (an image it cannot
size, a GPU out of memory) is one line, not a traceback.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from assistant.errors import UserError, WeightsMissing
from assistant.settings import Settings
from plugins.hub import at_revision, check_repo_id, is_local, unavailable
from plugins.qwen_vl.processor import ImageOnlyProcessor, load_processor
from plugins.qwen_vl.vision import images_of

DEFAULT_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"
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
        texts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        try:
            images = images_of(conversations)
        except ValueError as e:  # e.g. "absolute aspect ratio must be smaller than 200"
            raise UserError(f"the VLM cannot take this image: {e}") from None
        batch = self.processor(text=texts, images=images, do_resize=False, padding=True, return_tensors="pt")
        return batch.to(self.model.device)

    @torch.inference_mode()
    def generate(self, conversation: list[dict[str, Any]], max_new_tokens: int, logits_processor=None) -> str:
        """The greedy answer to one conversation, special tokens removed."""
        inputs = self.inputs([conversation])
        try:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      logits_processor=logits_processor)
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory running the VLM on {self.model.device}: {OOM_HINT}") from None
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

    @torch.inference_mode()
    def next_token_logits(self, conversations: list[list[dict[str, Any]]]) -> torch.Tensor:
        """[batch, vocab] float32 logits of the first answer token, from one forward pass."""
        inputs = self.inputs(conversations)
        try:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory running the VLM on {self.model.device}: {OOM_HINT}") from None


_lock = threading.Lock()
_loaded: dict[tuple[str, str, str, str | None, str | None], Vlm] = {}


def load(settings: Settings) -> Vlm:
    """The process's model for (vlm, device, dtype, attention, revision): loaded once, then shared."""
    if settings.vlm == "none":
        raise UserError(f"no VLM: --vlm none was given ({NO_VLM_HINT})")
    device = settings.vlm_device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.vlm_dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    key = (settings.vlm, device, dtype, settings.attn_implementation, settings.vlm_revision)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(*key)
        return _loaded[key]



def _missing(ref: str, revision: str | None) -> WeightsMissing:
    download = ref if revision is None else f"{ref} --revision {revision}"
    return WeightsMissing(f"the VLM '{at_revision(ref, revision)}' is not in the Hugging Face cache and the hub is "
                          f"unreachable: download it on a machine with internet (`hf download {download}`) or pass "
                          f"a local folder with --vlm; {NO_VLM_HINT}")


def _load(ref: str, device: str, dtype: str, attn_implementation: str | None, revision: str | None) -> Vlm:
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a weights bar per load is noise in a chat or a pipe
    source = ref
    if is_local(ref):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise WeightsMissing(f"no VLM folder at {ref}: download one (`hf download {DEFAULT_VLM} --local-dir "
                                 f"{ref}`), pass a hub id with --vlm, or use --vlm none ({NO_VLM_HINT})")
        if not (folder / "config.json").is_file():
            raise UserError(f"{ref} is not a Qwen2.5-VL model folder (no config.json in it)")
        source = str(folder)
        revision = None  # a folder has one revision: itself
    else:
        check_repo_id(ref, "VLM")
        if unavailable(ref, "config.json", revision):
            raise _missing(ref, revision)
    try:
        processor = load_processor(source, revision)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, dtype=getattr(torch, dtype), device_map=device, attn_implementation=attn_implementation,
            revision=revision,
        )
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory loading the VLM onto {device}: {OOM_HINT}") from None
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line
        if is_local(ref):  # a hub id fails with OSError or the HTTP client's own errors: all mean "not here"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot load the VLM from {ref}: {reason}") from None
        raise _missing(ref, revision) from None
    return Vlm(model.eval(), processor)
