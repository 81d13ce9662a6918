"""The training diptychs of an edits dataset (read by `plugins.evaluation.data`, as `icedit eval` reads it)."""

from __future__ import annotations

from PIL import Image
from torch.utils.data import Dataset

from plugins.evaluation.data import example
from plugins.icedit.diptych import make_diptych


def training_diptych(source: Image.Image, target: Image.Image, panel_width: int):
    """(input canvas, mask, target canvas): the engine's diptych, and the same with the target on the right."""
    canvas, mask = make_diptych(source, panel_width)
    w, h = canvas.width // 2, canvas.height
    wanted = canvas.copy()
    wanted.paste(target.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), (w, 0))
    return canvas, mask, wanted


class Diptychs(Dataset):
    """Each edit as the training diptych (PIL images) and its instruction."""

    def __init__(self, edits, panel_width: int):
        self.edits, self.panel_width = edits, panel_width

    def __len__(self) -> int:
        return len(self.edits)

    def __getitem__(self, index: int) -> dict:
        row = example(self.edits, index)
        canvas, mask, target = training_diptych(row["source"], row["target"], self.panel_width)
        return {"canvas": canvas, "mask": mask, "target": target, "instruction": row["instruction"]}
