"""The Qwen2.5-VL processor without its video half, built explicitly from a model folder.

`Qwen2_5_VLProcessor` insists on a video processor whose class needs torchvision, and
`AutoProcessor` on such a folder quietly returns only the tokenizer. So the tokenizer, the PIL
image processor and the chat template are loaded one by one and put together here.
"""

from __future__ import annotations

from transformers import (
    AutoTokenizer,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Images and text only; the attributes come from `__init__`'s signature (no video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_processor(folder: str) -> ImageOnlyProcessor:
    """Tokenizer (left padding, for batches that end where the answer starts) + image processor + template."""
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    processor_dict, _ = ProcessorMixin.get_processor_dict(folder)
    chat_template = processor_dict.get("chat_template") or tokenizer.chat_template
    if not chat_template:
        raise ValueError(
            f"{folder} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config)"
        )
    return ImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )
