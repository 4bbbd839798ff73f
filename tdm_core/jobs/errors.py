"""What can go wrong with a job, as exception types the manager, the routes and the failure messages tell apart."""

from __future__ import annotations


class JobError(ValueError):
    """A refused request; the message says why and what to do. `status` is the matching HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class NonFiniteLoss(RuntimeError):
    """A training loss became NaN or infinite."""


class NonFiniteWeights(RuntimeError):
    """The weights to be saved hold NaN or infinite values: nothing of that step is written or published."""


class NotOwned(RuntimeError):
    """A file the job was about to write exists and is not one the job's record names."""
