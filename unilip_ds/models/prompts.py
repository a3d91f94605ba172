"""Prompts of the generator: chat template, image tokens, query slots, padding,
CFG-null prompts and truncation, built with the MLLM's own tokenizer (ids read from it).

One sample's sequence is

    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n<img>  Q_1 ... Q_n
    '------------------------------ prefix -------------------------------'  queries

with content `Generate an image: {caption}` (T2I) or `Edit the image: {instruction}\\n<image>`
(edit; `<image>` = `<img>` + k x `<IMG_CONTEXT>` + `</img>`, the reference image's features go
at the `<IMG_CONTEXT>` positions). No system prompt. The null prompts (CFG) drop the text:
`Generate an image.` / `Edit the image.\\n<image>` (the image stays).

A batch holds the prefixes right-padded to the longest one; the n query slots follow that
padded block (`GenModel` appends them). With `position_ids = cumsum(mask) - 1` this is the
same computation as the reference's right-padded [prefix, queries, pad] rows, and it lets
the prefix (frozen, independent of the queries) be computed -- or read from a cache --
separately from the query pass. Only the caption / instruction is ever truncated.

User text never becomes image or turn tokens: the text between the template's special tokens
is tokenised with `split_special_tokens`, so `<img>` or `<|im_end|>` inside a caption stays
plain text (special tokens bound the tokenizer's segments, so any other text gets exactly the
ids of tokenising the whole prompt at once, as the reference does). `<image>` in a T2I caption
is plain text too (the reference trains on such captions); in an edit instruction it is
removed, as the reference's GPT-Image-Edit conversion does. Such rows are counted.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE = "<image>"  # the templates' placeholder for the reference image
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
REQUIRED_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END)
_SPECIAL = re.compile("(" + "|".join(map(re.escape, REQUIRED_TOKENS)) + ")")
_SLOT = "\x00"  # where the user's text goes in a template, filled after the split

TEMPLATES = {"t2i": "Generate an image: {}", "edit": "Edit the image: {}\n<image>"}
NULL_PROMPTS = {"t2i": "Generate an image.", "edit": "Edit the image.\n<image>"}


class PromptError(ValueError):
    """A tokenizer or a length budget that cannot build the generator's prompts."""


@dataclass
class PromptBatch:
    """Token ids of the prefixes of a batch, right-padded to the longest (P)."""
    input_ids: torch.Tensor  # (B, P) long; pad positions hold the pad id
    mask: torch.Tensor  # (B, P) bool: real tokens
    image_mask: torch.Tensor  # (B, P) bool: <IMG_CONTEXT> positions (edit)
    lengths: List[int]  # real tokens per row
    truncated: int = 0  # rows whose text was shortened to fit gen.max_length
    neutralised: int = 0  # rows whose text spelled a special token or <image> (kept as text / cut)

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.mask.to(device), self.image_mask.to(device),
                           self.lengths, self.truncated, self.neutralised)


def chat(content: str) -> str:
    """One user turn and the opened assistant turn (the template's final <|im_end|>\\n cut)."""
    return f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


class PromptBuilder:
    """Turns captions / instructions into `PromptBatch`es with a real tokenizer."""

    def __init__(self, tokenizer, num_image_tokens: int, num_queries: int, max_length: int):
        vocab = tokenizer.get_vocab()
        missing = [t for t in REQUIRED_TOKENS if t not in vocab]
        if missing:
            raise PromptError(f"the tokenizer lacks the special tokens {', '.join(missing)} "
                              "(an InternVL3 tokenizer has them)")
        self.tokenizer = tokenizer
        self.ids = {t: vocab[t] for t in REQUIRED_TOKENS}
        self.img_start_id = vocab[IMG_START]
        self.image_token_id = vocab[IMG_CONTEXT]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else vocab[IM_END]
        self.num_image_tokens = num_image_tokens
        self.num_queries = num_queries
        self.max_length = max_length
        # the longest prefix allowed: everything but the query slots
        self.max_prefix = max_length - num_queries
        for task in TEMPLATES:
            need = len(self._ids(task, ""))
            if need + 8 > self.max_prefix:
                raise PromptError(f"gen.max_length {max_length} leaves no room for text: a {task} "
                                  f"sequence needs {need + num_queries} tokens without any")

    def _text_ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _ids(self, task: str, text: Optional[str]) -> List[int]:
        """One prefix, chat(content) + <img>: the template's special tokens by id, the text
        between them (with the user's text in its place) tokenised as text."""
        ids: List[int] = []
        for part in self._parts(task, text is None):
            if isinstance(part, list):
                ids += part
            else:
                ids += self._text_ids(part.replace(_SLOT, text or ""))
        return ids

    @functools.lru_cache(maxsize=None)
    def _parts(self, task: str, null: bool) -> tuple:
        """The template split at its special tokens, once per (task, null): runs of special
        token ids (lists) and the text between them (with the user's slot)."""
        content = NULL_PROMPTS[task] if null else TEMPLATES[task].format(_SLOT)
        image = IMG_START + IMG_CONTEXT * self.num_image_tokens + IMG_END
        parts: list = []
        for part in _SPECIAL.split(chat(content.replace(IMAGE, image)) + IMG_START):
            if part in self.ids:
                if not parts or not isinstance(parts[-1], list):
                    parts.append([])
                parts[-1].append(self.ids[part])
            elif part:
                parts.append(part)
        return tuple(parts)

    @staticmethod
    def clean(task: str, text: Optional[str]) -> tuple:
        """(text as used, whether it spelled a special token or <image>): edit instructions
        lose <image>; everything else stays, to be tokenised as plain text."""
        if text is None:
            return None, False
        flagged = IMAGE in text or any(tok in text for tok in REQUIRED_TOKENS)
        return (text.replace(IMAGE, "") if task == "edit" else text), flagged

    def prefix_ids(self, task: str, text: Optional[str]) -> tuple:
        """(ids, truncated) of one prefix; only `text` is shortened, token by token."""
        text, _ = self.clean(task, text)
        ids = self._ids(task, text)
        if len(ids) <= self.max_prefix:
            return ids, False
        words = self._text_ids(text)
        keep = max(0, len(words) - (len(ids) - self.max_prefix))
        while True:  # re-tokenising the shortened text can merge differently: check again
            ids = self._ids(task, self.tokenizer.decode(words[:keep]))
            if len(ids) <= self.max_prefix or keep == 0:
                return ids, True
            keep -= 1

    def __call__(self, task: str, texts: Sequence[Optional[str]]) -> PromptBatch:
        """`texts[i] is None` gives the null prompt for row i."""
        if task not in TEMPLATES:
            raise ValueError(f"generator prompts: task must be t2i or edit, got '{task}'")
        rows, truncated, neutralised = [], 0, 0
        for text in texts:
            ids, cut = self.prefix_ids(task, text)
            rows.append(ids)
            truncated += cut
            neutralised += self.clean(task, text)[1]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
        image_mask = (input_ids == self.image_token_id) & mask
        if task == "edit" and not bool((image_mask.sum(1) == self.num_image_tokens).all()):
            raise PromptError("an edit prompt lost image tokens")  # cannot happen: text-only cuts
        return PromptBatch(input_ids, mask, image_mask, [len(r) for r in rows], truncated, neutralised)
