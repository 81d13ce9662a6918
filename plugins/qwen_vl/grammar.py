"""Grammar-constrained decoding: the VLM writes its plan under a JSON schema, token by token.

Library: llguidance (Microsoft's Rust grammar engine behind guidance). Chosen by measurement on this
stack (CPU torch 2.13, transformers 5.24, the Qwen2.5 tokenizer), against xgrammar,
lm-format-enforcer and outlines-core:
- it installs with no dependencies at all: xgrammar requires triton on Linux x86_64 (a GPU compiler,
  kept out of this project), outlines pulls ten packages, lm-format-enforcer's transformers
  integration no longer imports under transformers 5;
- it keeps strings valid JSON under `maxLength` (xgrammar 0.2.9 and lm-format-enforcer let raw
  control characters into length-limited strings: invalid JSON) and treats the tokenizer's special
  tokens as special (xgrammar allowed `<|video_pad|>` inside a string);
- it compiles a schema in milliseconds, so a schema per request costs nothing, and its mask is a
  small matcher API this module drives itself (its own torch helpers call torch.compile, which on a
  CPU needs a C compiler and seconds of warm-up). `benchmarks/grammar.py` measures the per-token
  cost beside unconstrained decoding.

The mask is made in the decode step, after the logits. Making it on a worker thread while the model
runs (llguidance lets go of the GIL; the chosen token read by a stopping criterion) was measured and
lost: on the tiny model the step grew from 2.3 to 2.9 ms against 2.4 ms in the step, since handing
each token to the thread and back costs more than the mask it hides.

The schema is built per request (`plugins.qwen_vl.rewriter.answer_schema`): only the intents that can
apply now, a jump only to a turn that exists, an edit only with an instruction, every string capped.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch


class GrammarError(ValueError):
    """The constraint cannot run (a tokenizer llguidance cannot read, a schema that does not compile)
    or refused what was generated: the rewriter decodes without it, or retries."""


_lock = threading.Lock()
_tokenizers: dict[int, Any] = {}


def tokenizer_of(tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
    """llguidance's view of a Hugging Face tokenizer (seconds to build for a 151k vocabulary: built once
    per tokenizer object, so once per loaded VLM)."""
    import llguidance.hf

    with _lock:
        key = id(tokenizer)
        if key not in _tokenizers:
            try:
                index = llguidance.hf.from_tokenizer(tokenizer, vocab_size, eos)
            except Exception as e:  # noqa: BLE001 - "only fast tokenizers are supported" and the like
                raise GrammarError(f"llguidance cannot read this tokenizer: {e}") from None
            _tokenizers[key] = (tokenizer, index)  # the tokenizer too: its id stays its own while kept
        return _tokenizers[key][1]


class SchemaConstraint:
    """A `transformers` logits processor for one greedy `generate` call of batch 1: every token outside
    what the JSON schema allows next gets -inf; once the JSON is complete only an end token may follow."""

    def __init__(self, tokenizer: Any, schema: dict[str, Any], vocab_size: int, eos: list[int]):
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            )
        except Exception as e:  # noqa: BLE001 - a schema llguidance cannot read
            raise GrammarError(f"the answer's schema does not compile: {e}") from None
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the answer's schema does not compile: {self.matcher.get_error()}")
        self.eos = eos
        self.words = np.zeros((vocab_size + 31) // 32, dtype="<u4")  # llguidance's words, little-endian
        self._seen: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != 1:
            raise GrammarError(f"one answer at a time: a batch of {input_ids.shape[0]} was given")
        if self._seen is not None:  # what generate chose since the last call
            for token in input_ids[0, self._seen :].tolist():
                if not self.matcher.consume_token(token):
                    raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self._seen = input_ids.shape[1]
        width = scores.shape[-1]
        if self.matcher.is_stopped():  # the JSON is complete: the answer ends here
            refused = torch.ones(width, dtype=torch.bool)
            refused[self.eos] = False
        else:  # one bit per token, token i at bit i % 32 of word i // 32; logits past the words refused
            self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
            bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")[:width]
            refused = torch.ones(width, dtype=torch.bool)
            refused[: len(bits)] = torch.from_numpy(bits == 0)
        return scores.masked_fill(refused.to(scores.device, non_blocking=True), -torch.inf)
