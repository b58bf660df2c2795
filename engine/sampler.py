"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, top-n logprobs (the
logits arrive with bias and penalties applied: engine/logits_processors.py)."""

from dataclasses import dataclass

import torch

from engine.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: {token_id: logprob} holding the sampled token and the top-n; None when not asked for
    logprobs: list[dict[int, float] | None]


def apply_filters(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """logits [S, V] (temperature applied); top_k [S] (V = off), top_p [S], min_p [S] -> filtered logits."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V]
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]  # keeps the token that crosses top_p
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def filter_rows(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Each row's top-k / top-p / min-p (its SamplingParams) applied to tempered logits [R, V]."""
    V, device = logits.shape[-1], logits.device
    top_k = torch.tensor(
        [min(p.top_k, V) if p.top_k > 0 else V for p in params], device=device
    )  # any int fits
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    return apply_filters(logits, top_k, top_p, min_p)


class Sampler:
    def __call__(
        self, logits: torch.Tensor, requests: list[Request], raw_logits: torch.Tensor | None = None
    ) -> SamplerOutput:
        """logits [S, V] fp32, one row per request, after engine/logits_processors.py; `raw_logits`, the
        model's own, give the logprobs (vLLM's default) when they differ."""
        S, V = logits.shape
        params = [r.params for r in requests]
        token_ids = logits.argmax(dim=-1)  # greedy rows keep this
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            temps = torch.tensor([params[i].temperature for i in random_rows], device=logits.device)
            x = logits[rows] / temps[:, None]
            if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
                x = filter_rows(x, [params[i] for i in random_rows])
            probs = x.softmax(dim=-1)
            # exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) samples from p; a request's
            # own generator makes its draws independent of what else is in the batch
            noise = torch.empty_like(probs).exponential_()
            for j, i in enumerate(random_rows):
                if requests[i].generator is not None:
                    noise[j] = torch.empty(V).exponential_(generator=requests[i].generator).to(noise.device)
            token_ids[rows] = (probs / noise).argmax(dim=-1)
        token_list = token_ids.tolist()
        raw = logits if raw_logits is None else raw_logits
        return SamplerOutput(token_list, self._logprobs(raw, params, token_list))

    def logprobs_of(
        self, logits: torch.Tensor, params, token_ids: list[int]
    ) -> list[dict[int, float] | None]:
        """Logprobs of one request's tokens, one per row of `logits` (verified drafts)."""
        return self._logprobs(logits, [params] * len(token_ids), token_ids)

    @staticmethod
    def _logprobs(logits, params, token_ids) -> list[dict[int, float] | None]:
        wanted = [p.logprobs for p in params]
        if all(n is None for n in wanted):
            return [None] * len(params)
        logprobs = logits.log_softmax(dim=-1)  # of the raw model output, as vLLM reports them
        top_n = max(n or 0 for n in wanted)
        top_vals, top_ids = (
            logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], logprobs[:, :0].long())
        )
        out: list[dict[int, float] | None] = []
        for i, n in enumerate(wanted):
            if n is None:
                out.append(None)
                continue
            entry = {token_ids[i]: logprobs[i, token_ids[i]].item()}
            if n:
                for tok, val in zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist(), strict=True):
                    entry.setdefault(tok, val)
            out.append(entry)
        return out
