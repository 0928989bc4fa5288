"""Errors for people: what the CLI prints instead of a traceback, and its exit codes.

    error: build.yaml: sources.0.text_feild: unknown key (did you mean 'text_field'?)

(a config's errors come from its loader, storage/config_file.py, already one line per problem).

Bad input (a config that does not validate, a YAML file that does not parse, a missing file, a
ValueError of the pipeline: these fail the same way every time) exits 2; any other failure 1;
an interrupt 130. `--debug` (or TINYLLAMA_DEBUG=1) prints the traceback as well.
"""

from __future__ import annotations

import os

DEBUG_ENV = "TINYLLAMA_DEBUG"
BAD_INPUT, FAILURE, INTERRUPTED = 2, 1, 130
MAX_MESSAGE_LINES = 6


class Interrupted(Exception):
    """Ctrl-C or SIGTERM ended the command after its clean-up; the message says what was done."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def exit_code(error: BaseException) -> int:
    return BAD_INPUT if isinstance(error, (ValueError, FileNotFoundError)) else FAILURE


def describe(error: BaseException) -> str:
    """The message the user sees for `error` (without the `error: ` prefix): its own text, or its
    cause's when it wraps one (a Ray task's error carries the remote traceback)."""
    cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[:MAX_MESSAGE_LINES] + [f"... ({len(lines) - MAX_MESSAGE_LINES} more lines; --debug shows all)"]
    return "\n".join(lines)
