"""Incremental detokenization and stop-string detection for one output sequence."""

from engine.request import Request
from engine.tokenizer import Tokenizer

_CONTEXT = 5  # prompt tokens decoded alongside, so a leading space or merged bytes come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, request: Request):
        self.tokenizer = tokenizer
        self.request = request
        self.prefix_offset = max(request.num_prompt_tokens - _CONTEXT, 0)
        self.read_offset = request.num_prompt_tokens
        self.output_text = ""
        stops = request.params.stops
        self.max_stop_len = max((len(s) for s in stops), default=0)

    def update(self, skip_last: bool, final: bool = False) -> str | None:
        """Decode the output tokens not yet read; return the stop string hit, if any.

        `skip_last`: the last token ended the sequence (EOS / stop id) and contributes no text.
        `final`: no more tokens will come, so a trailing incomplete UTF-8 sequence is emitted as is.
        """
        end = self.request.num_tokens - int(skip_last)
        window = self.request.token_ids(self.prefix_offset, end)  # only the tokens still to be read
        prefix = self.tokenizer.decode(window[: self.read_offset - self.prefix_offset])
        full = self.tokenizer.decode(window)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return None  # an incomplete UTF-8 sequence: wait for more bytes
        before = len(self.output_text)
        self.output_text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, end
        return self._check_stop(before)

    def _check_stop(self, before: int) -> str | None:
        if not self.max_stop_len:
            return None
        search_from = max(before - self.max_stop_len + 1, 0)
        best = None
        for stop in self.request.params.stops:
            idx = self.output_text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        end = idx + len(stop) if self.request.params.include_stop_str_in_output else idx
        self.output_text = self.output_text[:end]
        return stop
