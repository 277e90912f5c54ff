"""Greedy replies, batched with left padding, decoded from the new tokens only."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .text import pad_batch, pad_id, prompt_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 8,
             chat_template: bool = True, progress: bool = False, desc: str = "generate") -> list[str]:
    """The greedy reply of `model` to each prompt (chat template applied when the tokenizer has one).

    Prompts are batched by length (long with long), so a batch pads little; replies come back in input order.
    """
    device = model.get_input_embeddings().weight.device
    seqs = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    replies: list[str] = [""] * len(seqs)
    pad = pad_id(tokenizer)
    with tqdm(total=len(seqs), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, attn = pad_batch([seqs[i] for i in chunk], pad, "left")
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                replies[i] = text.strip()
            bar.update(len(chunk))
    return replies
