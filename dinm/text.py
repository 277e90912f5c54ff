"""Turning prompts and responses into token ids: chat template, prompt/response split, padding."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def format_prompt(tokenizer, prompt: str, chat_template: bool = True) -> str:
    """The text the model sees before its reply: the chat template with a generation prompt when the
    tokenizer has one (instruct models answer raw text badly), else the prompt itself."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of the formatted prompt. A chat template already holds its special tokens."""
    templated = chat_template and bool(getattr(tokenizer, "chat_template", None))
    text = format_prompt(tokenizer, prompt, chat_template)
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def end_of_reply_id(tokenizer) -> int | None:
    """The token that ends a reply (the chat template's end-of-turn token is the tokenizer's eos here)."""
    return tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0  # pragma: no cover


@dataclass
class Encoded:
    """One prompt + response, as ids. `ids[n_prompt:]` is the response (with its end token)."""

    ids: list[int]
    n_prompt: int


def encode_pair(
    tokenizer,
    prompt: str,
    response: str,
    *,
    chat_template: bool = True,
    max_prompt_tokens: int = 1024,
    max_response_tokens: int = 256,
    add_end: bool = True,
) -> Encoded:
    """Encode a prompt and the response to it.

    Prompt and response are tokenised separately so the split is exact. A prompt longer than
    `max_prompt_tokens` keeps its last tokens (the question and the assistant header);
    a response is cut at `max_response_tokens`.
    """
    p = prompt_ids(tokenizer, prompt, chat_template)
    if len(p) > max_prompt_tokens:
        logger.warning("prompt of %d tokens cut to its last %d (max_prompt_tokens)", len(p), max_prompt_tokens)
        p = p[-max_prompt_tokens:]
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"])[:max_response_tokens]
    end = end_of_reply_id(tokenizer)
    if add_end and end is not None and len(r) < max_response_tokens:
        r.append(end)
    return Encoded(p + r, len(p))


def pad_batch(seqs: list[list[int]], pad: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids to one (batch, tokens) tensor and its attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
