"""The job's own failures. Each carries its exit code (README, "Exit codes"); the message is one line."""
from __future__ import annotations


class JobError(Exception):
    exit_code = 1


class InputError(JobError, ValueError):
    """Refused: bad arguments, inputs, output or ledger (exit 2)."""

    exit_code = 2


class ReconciliationError(JobError):
    """The outputs do not account for every listed image; nothing published (exit 1)."""

    exit_code = 1


class LedgerNotUpdated(JobError):
    """OUT_DIR was published but the ledger commit failed (exit 3)."""

    exit_code = 3
