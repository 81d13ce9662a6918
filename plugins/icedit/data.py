"""The training diptychs of an edits dataset (read by `plugins.evaluation.data`, as `icedit eval` reads it)."""

from __future__ import annotations

from PIL import Image
from torch.utils.data import Dataset

from plugins.evaluation.data import example
from plugins.icedit.diptych import make_diptych


def training_diptych(
    source: Image.Image, target: Image.Image, panel_width: int, square: bool = False, bottom_crop: float = 0.0
):
    """(input canvas, mask, target canvas): the engine's diptych, and the same with the target on the right.

    `square` stretches both pictures to square panels (the official trainer's 512x512); `bottom_crop`
    first cuts that share of each picture's height off its bottom (the official trainer's 1/32 for
    MagicBrush: `height - height // 32` rows are kept)."""
    source, target = _cropped(source, bottom_crop), _cropped(target, bottom_crop)
    if square:  # the official order and filter: crop, resize (PIL's default, bicubic), then RGB
        source, target = (
            image.resize((panel_width, panel_width), Image.Resampling.BICUBIC).convert("RGB")
            for image in (source, target)
        )
    canvas, mask = make_diptych(source, panel_width)
    w, h = canvas.width // 2, canvas.height
    wanted = canvas.copy()
    wanted.paste(target.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), (w, 0))
    return canvas, mask, wanted


def _cropped(image: Image.Image, share: float) -> Image.Image:
    cut = int(image.height * share)
    return image.crop((0, 0, image.width, image.height - cut)) if cut else image


class Diptychs(Dataset):
    """Each edit as the training diptych (PIL images) and its instruction."""

    def __init__(self, edits, panel_width: int, square: bool = False, bottom_crop: float = 0.0):
        self.edits, self.panel_width = edits, panel_width
        self.square, self.bottom_crop = square, bottom_crop

    def __len__(self) -> int:
        return len(self.edits)

    def __getitem__(self, index: int) -> dict:
        row = example(self.edits, index)
        canvas, mask, target = training_diptych(
            row["source"], row["target"], self.panel_width, self.square, self.bottom_crop
        )
        return {"canvas": canvas, "mask": mask, "target": target, "instruction": row["instruction"]}
