"""Errors a user can act on. The CLI prints them as one paragraph, never a traceback."""


class QwenhwError(Exception):
    """Base class: `exit_code` is what the CLI exits with."""

    exit_code = 1


class BadInput(QwenhwError):
    """Unknown model, malformed JSON or config, impossible request (CLI exit 2)."""

    exit_code = 2


class DoesNotFit(QwenhwError):
    """No backend can run the model on this hardware (CLI exit 3). Carries the plan that explains why."""

    exit_code = 3

    def __init__(self, message: str, plan=None):
        super().__init__(message)
        self.plan = plan


class BackendUnavailable(QwenhwError):
    """A forced backend cannot run here (software missing, no device)."""

    exit_code = 2


class LoadFailed(QwenhwError):
    """Every ranked plan failed to load; the message lists each attempt."""

    exit_code = 1
