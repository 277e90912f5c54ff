"""Greedy replies, batched with left padding, decoded from the new tokens only."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import placement
from .text import end_of_reply_id, pad_batch, pad_id, prompt_ids


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 8,
             chat_template: bool = True, progress: bool = False, desc: str = "generate") -> list[str]:
    """The greedy reply of `model` to each prompt (chat template applied when the tokenizer has one).

    Prompts are batched by length (long with long), so a batch pads little; replies come back in input order.
    """
    seqs = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    replies = generate_ids(model, tokenizer, seqs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc=desc)
    return [text.strip() for text in tokenizer.batch_decode(replies, skip_special_tokens=True)]


@torch.no_grad()
def generate_ids(model, tokenizer, seqs: list[list[int]], *, max_new_tokens: int = 64, batch_size: int = 8,
                 progress: bool = False, desc: str = "generate") -> list[list[int]]:
    """The greedy continuation of each id sequence: its new ids, up to and including the end token."""
    device = placement.module_device(model.get_input_embeddings())
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    replies: list[list[int]] = [[] for _ in seqs]
    pad = pad_id(tokenizer)
    end = end_of_reply_id(tokenizer)
    with tqdm(total=len(seqs), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, attn = pad_batch([seqs[i] for i in chunk], pad, "left")
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
            for i, new in zip(chunk, out[:, ids.shape[1]:].tolist()):
                if end is not None and end in new:
                    new = new[:new.index(end) + 1]  # what follows the end token is padding
                replies[i] = new
            bar.update(len(chunk))
    return replies
