"""The VLM judge: which of two candidates follows the instruction, and whether one edit carries it out
(the agent's self-check), each read off one forward pass."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

import prompts
from plugins.qwen_vl import model
from plugins.qwen_vl.options import QwenVlOptions
from plugins.qwen_vl.vision import image_part

ANSWERS = ("A", "B")
VERDICTS = ("Yes", "No")


def letter_ids(tokenizer) -> list[int]:
    """The token ids of the answers "A" and "B"; each must be one token, or the logits mean nothing."""
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in ANSWERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(
            f"the tokenizer splits the answers {ANSWERS} into {ids}: the judge needs one token each"
        )
    return [i[0] for i in ids]


def first_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """The first token of each answer word: its logit stands for the word when the first tokens differ
    (Qwen2.5's vocabulary holds "Yes" and "No" whole; a byte-level tiny one starts them "Y" and "N")."""
    ids = [tokenizer.encode(word, add_special_tokens=False)[:1] for word in words]
    if any(not i for i in ids) or len({i[0] for i in ids}) != len(words):
        raise ValueError(f"the tokenizer starts the answers {words} with the same token: {ids}")
    return [i[0] for i in ids]


class QwenPairJudge:
    """P(A follows the instruction better than B) = softmax over the next-token logits of "A" and "B"."""

    def __init__(self, options: QwenVlOptions):
        self.options = options

    def conversation(
        self, instruction: str, source: Image.Image, a: Image.Image, b: Image.Image
    ) -> list[dict]:
        def image(picture: Image.Image) -> dict[str, Any]:
            return image_part(picture, self.options.min_pixels, self.options.max_pixels)

        return [
            {"role": "system", "content": prompts.load("judge_pairwise.md")},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Source:"},
                    image(source),
                    {"type": "text", "text": "Candidate A:"},
                    image(a),
                    {"type": "text", "text": "Candidate B:"},
                    image(b),
                    {"type": "text", "text": f"Instruction: {instruction}\nAnswer A or B."},
                ],
            },
        ]

    def compare(self, instruction: str, source: Image.Image, a: Image.Image, b: Image.Image) -> float:
        return self.compare_many(instruction, source, [(a, b)])[0]


class QwenJudge(QwenPairJudge):
    """The pairwise judge, and the self-check's: P("Yes") for one edit."""

    def check(self, instruction: str, source: Image.Image, edit: Image.Image) -> float:
        """P("Yes": `edit` carries out the instruction and keeps the rest) = softmax over "Yes" and "No"."""
        vlm = model.load(self.options)
        conversation = [
            {"role": "system", "content": prompts.load("judge_check.md")},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Source:"},
                    image_part(source, self.options.min_pixels, self.options.max_pixels),
                    {"type": "text", "text": "Edited:"},
                    image_part(edit, self.options.min_pixels, self.options.max_pixels),
                    {"type": "text", "text": f"Instruction: {instruction}\nAnswer Yes or No."},
                ],
            },
        ]
        logits = vlm.next_token_logits([conversation])
        ids = first_token_ids(vlm.processor.tokenizer, VERDICTS)
        return float(torch.softmax(logits[0, ids], dim=-1)[0])

    def compare_many(
        self, instruction: str, source: Image.Image, pairs: list[tuple[Image.Image, Image.Image]]
    ) -> list[float]:
        """P(A) for each (A, B) pair, from one left-padded forward pass over all of them."""
        vlm = model.load(self.options)
        logits = vlm.next_token_logits([self.conversation(instruction, source, a, b) for a, b in pairs])
        return torch.softmax(logits[:, letter_ids(vlm.processor.tokenizer)], dim=-1)[:, 0].tolist()
