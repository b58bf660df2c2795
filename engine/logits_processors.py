"""What a request's sampling parameters do to its logits before a token is drawn, for a whole batch at
once on the logits' device (vLLM v1's sampler order): `logit_bias` added, stop tokens masked until
`min_tokens`, then the repetition, frequency and presence penalties (OpenAI's and vLLM's definitions:
repetition over prompt and output tokens, frequency and presence over output tokens only).

Each logits row is a (request, draft prefix) pair: a verified speculative position sees the drafts before
it as already generated, so the penalties at position j count drafts[:j] too. Logprobs are reported from
the raw logits (vLLM's default), so callers keep those and sample from what this returns.
"""

from dataclasses import dataclass

import torch

from engine.request import Request
from engine.sampling_params import SamplingParams


@dataclass
class LogitsRow:
    request: Request
    drafts: list[int]  # draft tokens before this row's position (empty for a plain sampled row)


def needs_processing(params: SamplingParams) -> bool:
    return bool(
        params.logit_bias
        or params.min_tokens
        or params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
    )


def _stop_ids(request: Request) -> list[int]:
    if request.params.ignore_eos:
        return list(request.params.stop_token_ids)
    return sorted(set(request.eos_token_ids) | set(request.params.stop_token_ids))


class _Batch:
    """Flat (row, column, value) lists gathered on the host, sent to the device in one copy each."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []

    def add(self, row: int, cols: list[int], vals: list[float] | None = None) -> None:
        self.rows += [row] * len(cols)
        self.cols += cols
        if vals is not None:  # the bias; masks and presence need only the positions
            self.vals += vals

    def index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.rows, device=device), torch.tensor(self.cols, device=device)


def apply_logits_processing(logits: torch.Tensor, rows: list[LogitsRow]) -> torch.Tensor:
    """logits [R, V], one row per entry of `rows` -> the logits to sample from: a new tensor with every
    request's bias, min_tokens and penalties applied, or `logits` itself when no row asks for any."""
    active = [i for i, row in enumerate(rows) if needs_processing(row.request.params)]
    if not active:
        return logits
    device, V = logits.device, logits.shape[-1]
    idx = torch.tensor(active, device=device)
    x = logits[idx].float()  # [A, V]: a copy
    bias, masked, seen, counts = _Batch(), _Batch(), _Batch(), _Batch()
    rep, pres, freq = [], [], []
    for a, i in enumerate(active):
        request, drafts = rows[i].request, rows[i].drafts
        p = request.params
        output = request.output_token_ids + drafts
        if p.logit_bias:
            bias.add(a, [t for t in p.logit_bias if t < V], [v for t, v in p.logit_bias.items() if t < V])
        if len(output) < p.min_tokens:
            masked.add(a, [t for t in _stop_ids(request) if t < V])
        if p.repetition_penalty != 1.0:
            seen.add(a, [t for t in request.prompt_token_ids + output if t < V])
        if p.presence_penalty or p.frequency_penalty:
            counts.add(a, [t for t in output if t < V])
        rep.append(p.repetition_penalty)
        pres.append(p.presence_penalty)
        freq.append(p.frequency_penalty)
    if bias.rows:
        x.index_put_(bias.index(device), torch.tensor(bias.vals, device=device), accumulate=True)
    if masked.rows:
        x.index_put_(masked.index(device), torch.tensor(float("-inf"), device=device))
    if seen.rows:
        in_context = torch.zeros_like(x, dtype=torch.bool)
        in_context.index_put_(seen.index(device), torch.tensor(True, device=device))
        penalty = torch.tensor(rep, device=device)[:, None].expand_as(x)
        scaled = torch.where(x > 0, x / penalty, x * penalty)
        x = torch.where(in_context, scaled, x)
    if counts.rows:
        n = torch.zeros_like(x)
        n.index_put_(counts.index(device), torch.ones(len(counts.rows), device=device), accumulate=True)
        x -= torch.tensor(freq, device=device)[:, None] * n
        x -= torch.tensor(pres, device=device)[:, None] * (n > 0).to(x.dtype)
    out = logits.clone()
    out[idx] = x.to(out.dtype)
    return out
