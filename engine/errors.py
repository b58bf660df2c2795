"""ParameterError: bad input a caller can fix, naming the parameter (the OpenAI error body's `param`).
A ValueError, so callers that only know ValueError still catch it; it pickles with its parameter (Ray
carries it from a worker to the frontend)."""


class ParameterError(ValueError):
    def __init__(self, parameter: str, detail: str):
        super().__init__(f"{parameter}: {detail}")
        self.parameter, self.detail = parameter, detail

    def __reduce__(self):
        return ParameterError, (self.parameter, self.detail)
