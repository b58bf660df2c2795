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


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the GPU: pinned and copied asynchronously."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass
class Draws:
    """A step's samples as tensors: token ids [S]; for the rows asking for logprobs (`wanted[i]` not None),
    the sampled token's logprob [S] and the top-n [S, n]. On the device when drawn; `to_host` starts the
    copy (pinned, asynchronous on a GPU) and `output` reads it once it has landed."""

    token_ids: torch.Tensor
    wanted: list[int | None]
    sampled_logprobs: torch.Tensor | None = None
    top_vals: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None

    def to_host(self) -> "Draws":
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or not t.is_cuda:
                return t
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        token_ids = copy(self.token_ids)
        assert token_ids is not None
        return Draws(
            token_ids,
            self.wanted,
            copy(self.sampled_logprobs),
            copy(self.top_vals),
            copy(self.top_ids),
        )

    def output(self) -> SamplerOutput:
        token_ids = self.token_ids.tolist()
        if self.sampled_logprobs is None:
            return SamplerOutput(token_ids, [None] * len(token_ids))
        sampled = self.sampled_logprobs.tolist()
        top_vals = self.top_vals.tolist() if self.top_vals is not None else None
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        out: list[dict[int, float] | None] = []
        for i, n in enumerate(self.wanted):
            if n is None:
                out.append(None)
                continue
            entry = {token_ids[i]: sampled[i]}
            if n and top_vals is not None and top_ids is not None:
                for tok, val in zip(top_ids[i][:n], top_vals[i][:n], strict=True):
                    entry.setdefault(tok, val)
            out.append(entry)
        return SamplerOutput(token_ids, out)


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
    top_k = to_device([min(p.top_k, V) if p.top_k > 0 else V for p in params], torch.int64, device)
    top_p = to_device([p.top_p for p in params], torch.float32, device)
    min_p = to_device([p.min_p for p in params], torch.float32, device)
    return apply_filters(logits, top_k, top_p, min_p)


class Sampler:
    def __call__(
        self, logits: torch.Tensor, requests: list[Request], raw_logits: torch.Tensor | None = None
    ) -> SamplerOutput:
        """logits [S, V] fp32, one row per request, after engine/logits_processors.py; `raw_logits`, the
        model's own, give the logprobs (vLLM's default) when they differ."""
        return self.sample(logits, requests, raw_logits).output()

    def sample(
        self, logits: torch.Tensor, requests: list[Request], raw_logits: torch.Tensor | None = None
    ) -> Draws:
        """As __call__, the draws left on the device: nothing here waits for the GPU."""
        S, V = logits.shape
        params = [r.params for r in requests]
        token_ids = logits.argmax(dim=-1)  # greedy rows keep this
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = to_device(random_rows, torch.int64, logits.device)
            temps = to_device([params[i].temperature for i in random_rows], torch.float32, logits.device)
            x = logits[rows] / temps[:, None]
            if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
                x = filter_rows(x, [params[i] for i in random_rows])
            probs = x.softmax(dim=-1)
            # exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) samples from p; a request's
            # own generator makes its draws independent of what else is in the batch
            noise = torch.empty_like(probs).exponential_()
            for j, i in enumerate(random_rows):
                if requests[i].generator is not None:
                    draw = torch.empty(V).exponential_(generator=requests[i].generator)
                    noise[j] = (
                        draw.pin_memory().to(noise.device, non_blocking=True) if noise.is_cuda else draw
                    )
            token_ids[rows] = (probs / noise).argmax(dim=-1)
        raw = logits if raw_logits is None else raw_logits
        return self._with_logprobs(raw, [p.logprobs for p in params], token_ids)

    def logprobs_of(
        self, logits: torch.Tensor, params, token_ids: list[int]
    ) -> list[dict[int, float] | None]:
        """Logprobs of one request's tokens, one per row of `logits` (verified drafts)."""
        tokens = torch.tensor(token_ids, dtype=torch.int64, device=logits.device)
        return self._with_logprobs(logits, [params.logprobs] * len(token_ids), tokens).output().logprobs

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, wanted: list[int | None], token_ids: torch.Tensor) -> Draws:
        if all(n is None for n in wanted):
            return Draws(token_ids, wanted)
        logprobs = logits.log_softmax(dim=-1)  # of the raw model output, as vLLM reports them
        sampled = logprobs.gather(1, token_ids[:, None])[:, 0]
        top_n = max(n or 0 for n in wanted)
        if not top_n:
            return Draws(token_ids, wanted, sampled)
        top_vals, top_ids = logprobs.topk(top_n, dim=-1)
        return Draws(token_ids, wanted, sampled, top_vals, top_ids)
