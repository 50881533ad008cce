"""The exception tree: each error carries the data a caller needs to map it to a status."""

from __future__ import annotations


class ForecasterError(Exception):
    """Base of every error forecaster raises on purpose."""


class InvalidInputError(ForecasterError, ValueError):
    """Input that breaks a rule: names the field (or line) and the reason.

    Maps to HTTP 400/422, gRPC INVALID_ARGUMENT, CLI exit code 2.
    """

    def __init__(self, field: str, reason: str, *, line: int | None = None) -> None:
        self.field = field
        self.reason = reason
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{field}: {reason}")


class InsufficientHistoryError(ForecasterError):
    """Too little history for a model or a request; says how much is needed."""

    def __init__(self, what: str, needed: int, available: int) -> None:
        self.what = what
        self.needed = needed
        self.available = available
        super().__init__(
            f"{what} needs at least {needed} observed steps of history, got {available}"
        )


class NotFittedError(ForecasterError, RuntimeError):
    """A model was asked to predict or update before fit."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"model {model!r} is not fitted: call fit(history) first")


class SourceError(ForecasterError):
    """A data source answered, but not with what was asked (bad query, several series, none)."""

    def __init__(self, message: str, *, query: str | None = None) -> None:
        self.query = query
        super().__init__(message)


class SourceUnavailableError(ForecasterError):
    """A data source could not be reached or timed out after its retries."""

    def __init__(self, message: str, *, server: str | None = None) -> None:
        self.server = server
        super().__init__(message)


class UnknownTargetError(ForecasterError, KeyError):
    """A target id that the engine does not know."""

    def __init__(self, target_id: str) -> None:
        self.target_id = target_id
        super().__init__(target_id)

    def __str__(self) -> str:
        return f"unknown target {self.target_id!r}"


class TooManyTargetsError(ForecasterError):
    """A scaler request would create a target beyond the configured maximum (maxTargets)."""

    def __init__(self, target_id: str, limit: int) -> None:
        self.target_id, self.limit = target_id, limit
        super().__init__(
            f"cannot add target {target_id!r}: the service already has its maximum of {limit} "
            "targets (maxTargets); idle targets are dropped after targetIdleTimeout"
        )


class NotReadyError(ForecasterError):
    """No fresh forecast or current value is available yet; retry later."""

    def __init__(self, message: str, *, retry_after_seconds: float = 30.0) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__(message)
