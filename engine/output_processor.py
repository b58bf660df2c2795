"""From sequences to what a caller sees: each user request (n sequences sharing a prompt) detokenized
incrementally, stop strings found as tokens arrive, and a RequestOutput built for every request a step
changed (every step when streaming, else once finished). vLLM's OutputProcessor, in the engine's process."""

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, ComputeUsage, RequestOutput
from engine.request import Request
from engine.tokenizer import Tokenizer


class RequestState:
    """A user request: n sequences sharing one prompt."""

    def __init__(
        self, request_id: str, prompt: str | None, children: list[Request], tokenizer: Tokenizer, stream: bool
    ):
        self.request_id = request_id
        self.stream = stream  # outputs every step; otherwise only when finished
        self.prompt = prompt
        self.children = children
        self.detokenizers = {r.request_id: IncrementalDetokenizer(tokenizer, r) for r in children}

    @property
    def finished(self) -> bool:
        return all(r.is_finished for r in self.children)

    def output(self) -> RequestOutput:
        outs = []
        for i, req in enumerate(self.children):
            want = req.params.logprobs is not None
            outs.append(
                CompletionOutput(
                    index=i,
                    text=self.detokenizers[req.request_id].output_text,
                    token_ids=list(req.output_token_ids),
                    cumulative_logprob=req.cumulative_logprob if want else None,
                    logprobs=list(req.logprobs) if want else None,
                    finish_reason=req.status.value if req.is_finished else None,
                    stop_reason=req.stop_reason,
                )
            )
        first = self.children[0]
        return RequestOutput(
            self.request_id,
            self.prompt,
            first.prompt_token_ids,
            outs,
            finished=self.finished,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            compute=sum((r.compute for r in self.children), ComputeUsage()),
            draft_compute=sum((r.draft_compute for r in self.children), ComputeUsage()),
            queued=(first.arrival_wall, first.scheduled_wall) if first.scheduled_wall else None,
        )


class OutputProcessor:
    """The live user requests. The scheduler asks it about stop strings as each token is appended
    (`stop_string`, `finalize`: the scheduler's StopChecker); the engine collects outputs after a step."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[str, RequestState] = {}
        self._by_sequence: dict[str, RequestState] = {}
        self._touched: dict[str, RequestState] = {}  # changed since the last collect(): aborts, new tokens

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def add(self, state: RequestState, resumed: bool) -> None:
        """`resumed`: its first tokens came from another worker; their text is part of the output."""
        self._states[state.request_id] = state
        for req in state.children:
            self._by_sequence[req.request_id] = state
            if resumed:
                state.detokenizers[req.request_id].update(skip_last=False)

    def get(self, request_id: str) -> RequestState | None:
        return self._states.get(request_id)

    def touch(self, state: RequestState) -> None:
        self._touched[state.request_id] = state

    def touch_sequence(self, req: Request) -> None:
        """A sequence got tokens; one forgotten already (it finished while a step ran ahead) has none."""
        state = self._by_sequence.get(req.request_id)
        if state is not None:
            self.touch(state)

    def stop_string(self, req: Request) -> str | None:
        """After a token is appended: the stop string it completes, if the text is being followed."""
        state = self._by_sequence[req.request_id]
        if not (state.stream or req.params.stop):
            return None  # detokenized once, at the end
        return state.detokenizers[req.request_id].update(skip_last=False)

    def finalize(self, req: Request, ends_here: bool) -> None:
        """The sequence finished (a stop token or id is left out of the text when `ends_here`)."""
        if not isinstance(req.stop_reason, str):  # a stop string already cut the final text
            self._by_sequence[req.request_id].detokenizers[req.request_id].update(
                skip_last=ends_here, final=True
            )

    def collect(self) -> list[RequestOutput]:
        """An output for every request changed since the last call (non-streaming ones once finished);
        finished requests are forgotten."""
        outputs = []
        for state in self._touched.values():
            if not state.stream and not state.finished:
                continue
            output = state.output()
            if output.finished:
                self._forget(state)
            outputs.append(output)
        self._touched.clear()
        return outputs

    def has_pending(self) -> bool:
        """Changes not collected yet (an abort is reported at the next step)."""
        return bool(self._touched)

    def _forget(self, state: RequestState) -> None:
        del self._states[state.request_id]
        for req in state.children:
            self._by_sequence.pop(req.request_id, None)
