"""Which exceptions mean "the caller's input is at fault" (a 4xx) -- and nothing else does.

Only the project's own classes count: a bare ValueError or KeyError from a bug must surface as a logged 5xx
(counted in /metrics), not be disguised as the user's mistake and never retried.
"""

from __future__ import annotations

from osprey_core.errors import ConfigError, ImageError, PromptError, RegionError


class InputError(ValueError):
    """Base of the backend's own bad-input errors; `status_code` is the HTTP status it maps to."""

    status_code = 422

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


# The core's input errors (its CheckpointError is an operator problem, not the caller's).
CORE_INPUT_ERRORS: tuple[type[Exception], ...] = (RegionError, ImageError, PromptError, ConfigError)
INPUT_ERRORS: tuple[type[Exception], ...] = (InputError, *CORE_INPUT_ERRORS)


def is_input_error(exc: BaseException) -> bool:
    return isinstance(exc, INPUT_ERRORS)


def input_status(exc: BaseException) -> int:
    """The 4xx for an input error: its own `status_code` when it has one in 400..499, else 422."""
    status = getattr(exc, "status_code", 422)
    return status if isinstance(status, int) and 400 <= status < 500 else 422
