"""Greedy replies, batched with left padding, decoded from the new tokens only."""

from __future__ import annotations

import torch

from .text import pad_batch, pad_id, prompt_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 8,
             chat_template: bool = True) -> list[str]:
    """The greedy reply of `model` to each prompt (chat template applied when the tokenizer has one)."""
    device = model.get_input_embeddings().weight.device
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [prompt_ids(tokenizer, p, chat_template) for p in prompts[start:start + batch_size]]
        ids, attn = pad_batch(seqs, pad_id(tokenizer), "left")
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id(tokenizer))
        new = out[:, ids.shape[1]:]
        replies += [r.strip() for r in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return replies
