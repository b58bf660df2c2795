"""Verification of drafted tokens against the target model's logits, keeping its output distribution exact.

Rows: the logits at the request's last real token and at each of its k drafted tokens ([k + 1, V]). Greedy
requests accept drafts while they equal the argmax and then take the argmax (the bonus token when all k
were right). Sampled requests use rejection sampling for a deterministic drafter (its proposal q is one-
hot): draft d_i is accepted with probability p_i(d_i); at the first rejection the token is drawn from p_i
with d_i removed and renormalized, i.e. from max(p_i - q_i, 0) normalized; when all are accepted the
bonus is drawn from p_k. Each emitted token is then distributed exactly as plain sampling from p would
give (Leviathan et al., 2023; Chen et al., 2023). p is the sampler's distribution: temperature, top-k,
top-p and min-p applied. Draws use the request's own generator when it has a seed.
"""

import torch

from engine.request import Request
from engine.sampler import filter_rows


def target_probs(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """[R, V] logits -> the sampler's distribution for this request's parameters."""
    p = request.params
    x = logits / p.temperature
    if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
        x = filter_rows(x, [p] * x.shape[0])
    return x.softmax(dim=-1)


def verify_greedy(best: list[int], drafts: list[int]) -> tuple[list[int], int]:
    """best: the argmax at the last real token and each draft ([k + 1]) -> (emitted tokens, accepted)."""
    accepted = 0
    while accepted < len(drafts) and best[accepted] == drafts[accepted]:
        accepted += 1
    return drafts[:accepted] + [best[accepted]], accepted


def verify(logits: torch.Tensor, drafts: list[int], request: Request) -> tuple[list[int], int]:
    """logits [k + 1, V] fp32 for k drafts -> (emitted tokens: the accepted drafts and one more, number of
    drafts accepted)."""
    k = len(drafts)
    if request.params.greedy:
        return verify_greedy(logits.argmax(dim=-1).tolist(), drafts)
    probs = target_probs(logits, request).float().cpu()
    gen = request.generator
    uniforms = torch.rand(k, generator=gen) if gen is not None else torch.rand(k)
    for i, d in enumerate(drafts):
        if uniforms[i].item() < probs[i, d].item():
            continue
        residual = probs[i].clone()
        residual[d] = 0.0
        total = residual.sum()
        if total <= 0:  # p is one-hot on the draft (a rejection only by rounding): accept it
            continue
        token = int(torch.multinomial(residual / total, 1, generator=gen).item())
        return drafts[:i] + [token], i
    bonus = int(torch.multinomial(probs[k], 1, generator=gen).item())
    return drafts + [bonus], k
