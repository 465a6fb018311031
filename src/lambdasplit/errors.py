"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class LambdaSplitError(Exception):
    """An error whose message tells the user what went wrong and what to do next."""


class UnsupportedArchitectureError(LambdaSplitError):
    """The model's architecture has no split adapter."""


class SplitError(LambdaSplitError):
    """An invalid split point for the model."""


class SourceError(LambdaSplitError):
    """A model source that cannot be found or read."""


class PromptError(LambdaSplitError):
    """An empty prompt, or one that does not fit the context window."""


class WireError(LambdaSplitError):
    """A frame that is malformed, too large, or not what the protocol expects."""
