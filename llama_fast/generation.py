"""Text generation with the reference Llama 3 (``llama_fast.model.Transformer``): a batch of
prompts of any lengths, left-padded into one KV-cached batch, greedy or sampled.

    new_tokens = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llama_fast.model import Transformer


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits (B, vocab) float32 -> (B,) token ids."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus: keep the most likely tokens whose mass before them is below top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises itself
        return order.gather(-1, choice)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: Transformer, prompt_tokens: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue a batch of prompts of any lengths; returns the new tokens of each.

    Prompts are left-padded into one batch; each row keeps its own positions (0 at its
    first token), so a row's tokens do not depend on what it is batched with. Greedy at
    ``temperature=0``, else sampling with nucleus ``top_p``. A row stops after emitting one
    of ``stop_tokens`` (which is included in its output), or after ``max_new_tokens``.
    Uses the model's cache if it is big enough, otherwise makes one and drops it after.
    """
    if isinstance(prompt_tokens, Tensor):
        prompt_tokens = [prompt_tokens.tolist()] if prompt_tokens.dim() == 1 else prompt_tokens.tolist()
    prompts = [list(map(int, p)) for p in prompt_tokens]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if max_new_tokens < 1:
        return [[] for _ in prompts]

    device = model.tok_embeddings.weight.device
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = longest + max_new_tokens
    cache = model.cache
    own_cache = cache is None or cache.k_cache.shape[0] < bsz or cache.k_cache.shape[1] < total
    if own_cache:
        model.setup_cache(bsz, total)
    try:
        # Left padding: row b's prompt ends at column `longest - 1`; its pads get negative
        # positions. The pad id is arbitrary (0): nothing attends to pads.
        tokens = torch.zeros(bsz, longest, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, longest - len(p):] = torch.tensor(p, device=device)
        input_pos = torch.arange(longest, device=device)[None] - (longest - lengths)[:, None]
        logits = model(tokens, input_pos, last_only=True)[:, -1]

        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        out = []
        pos = lengths.clone()  # the position of the token about to be fed
        for step in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_p, generator)
            out.append(torch.where(done, -1, nxt))  # -1: the row had already stopped
            done |= torch.isin(nxt, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = model(nxt[:, None], pos[:, None])[:, -1]
            pos += 1
    finally:
        if own_cache:
            model.drop_cache()
    new = torch.stack(out, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in new]
