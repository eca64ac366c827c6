"""User-facing errors. The CLI prints their message on one line and exits with status 2."""


class SynPoError(Exception):
    """A problem the user can fix (bad input, missing model, no CUDA, ...)."""


class InputError(SynPoError):
    """An input file or array is unusable."""


class ModelError(SynPoError):
    """A model is unknown, missing, not downloadable, or corrupt."""


class Cancelled(SynPoError):
    """The caller's cancel() returned True; nothing was produced."""
