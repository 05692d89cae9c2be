"""User-facing error types.

Every error a studio engineer can cause or fix (a setting, an input file, a manifest, a service
that is down) is an ``EmoError`` whose message names the input and what to do about it. The CLI
prints the message and exits with ``exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations


class EmoError(Exception):
    """Base class of errors whose message is meant for the person running emo."""

    exit_code = 1


class SettingsError(EmoError):
    """An ``EMO_*`` setting is invalid (or two disagree); the message names the variable. A
    file or an option the user gave is an ``InputError``."""

    exit_code = 2


class InputError(EmoError):
    """A user's input (a file, an option) cannot be used; the message says which and why."""

    exit_code = 2


class MediaError(EmoError):
    """An image, audio or video file cannot be used; the message names the file."""

    exit_code = 2


class StoreError(EmoError):
    """Base class of object-store errors."""


class ObjectNotFound(StoreError):
    """The requested object key does not exist."""


class StoreUnavailable(StoreError):
    """The object store did not answer after bounded retries; the message names the endpoint."""

    exit_code = 3


class StoreAuthError(StoreError):
    """The object store refused the credentials; the message names the settings to fix."""

    exit_code = 2


class TrainingDiverged(EmoError):
    """Training's loss stopped being a number; the message names the step and what to change
    in the recipe (the user's to fix, like any input)."""

    exit_code = 2


class JobStateError(EmoError):
    """An illegal job state transition, lease operation or plan change was requested."""


class EpochSuperseded(JobStateError):
    """A render's lease epoch is no longer the job's: another render acquired the job since,
    so this one may not record segments or publish outputs (the message names both epochs)."""


class NotFound(EmoError):
    """A batch, job or segment named by the caller does not exist."""

    exit_code = 2
