"""The store's one transient-fault policy: what a retry can fix, how long to keep trying, and
what to log about it.

Object stores fail for a while and come back: a dropped connection, a reset or short body mid
read, 5xx answers and SlowDown while a server restarts or sheds load, timeouts. botocore's own
retries (storage/s3.py) absorb a blip of a second; this policy carries every store call on top
of them through an outage of minutes: capped exponential backoff with jitter until a deadline,
TINYLLAMA_STORE_RETRY_S (or the AWS profile's tinyllama_store_retry_s), DEFAULT_DEADLINE_S
unless set. What a retry cannot fix (access denied, a missing object or bucket, a bad request)
fails at once.

The deadline counts from an operation's first failure and starts again once it makes progress
(a streaming read that resumes and reads on). An outage is logged once per endpoint and
process, however many threads ride it out: a WARNING when it starts and an INFO with its
duration when a call gets through again.

    policy = RetryPolicy(deadline_s=300)
    data = policy.call(fetch, endpoint="http://s3:9000", what="read s3://b/k")
"""

from __future__ import annotations

import contextvars
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from s3transfer.exceptions import RetriesExceededError
from urllib3.exceptions import HTTPError as URLLib3Error

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ENV = "TINYLLAMA_STORE_RETRY_S"
RETRY_PROFILE_KEY = "tinyllama_store_retry_s"
# A real S3 or MinIO outage (a restart, a failover, a throttling spell) lasts minutes.
DEFAULT_DEADLINE_S = 300.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 10.0

# Answers that say "not now" rather than "never": server errors, throttling, request timeouts.
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "PriorRequestNotComplete",
}


class ShortBody(Exception):
    """A response ended before the length it announced (the store resumes the read)."""


class OutageTooLong(Exception):
    """Transient failures went on past the deadline; `error` is the last one."""

    def __init__(self, error: BaseException, waited_s: float, deadline_s: float):
        super().__init__(f"{error} (still failing after {waited_s:.0f} s; {RETRY_ENV}={deadline_s:g})")
        self.error, self.waited_s, self.deadline_s = error, waited_s, deadline_s


def is_transient(error: BaseException) -> bool:
    """Whether waiting and trying again can fix `error`."""
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in TRANSIENT_STATUS or error.response.get("Error", {}).get("Code") in TRANSIENT_CODES
    if isinstance(error, RetriesExceededError):  # s3transfer's own retries of a download ran out
        return error.last_exception is None or is_transient(error.last_exception)
    # Connection refused/reset/closed, timeouts, a body cut short (botocore's or the store's own check).
    return isinstance(
        error,
        (BotocoreConnectionError, HTTPClientError, IncompleteReadError, ShortBody, URLLib3Error, socket.timeout, ConnectionError),
    )


def deadline_setting(value: str | float | None, source: str = RETRY_ENV) -> float:
    """The deadline in seconds from a setting (None: the default); a bad one raises ValueError."""
    if value is None or value == "":
        return DEFAULT_DEADLINE_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise ValueError(f"{source} must be a number of seconds >= 0, got {value!r}")
    return seconds


class _Outage:
    """One endpoint's failing spell in this process: logged when it starts and when it ends."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.since: float | None = None
        self._lock = threading.Lock()

    def failed(self, error: BaseException, what: str, deadline_s: float) -> None:
        with self._lock:
            if self.since is not None:
                return
            self.since = time.monotonic()
        log.warning(
            "S3 endpoint %s is failing (%s: %s); retrying for up to %g s (%s)",
            self.endpoint, what, one_line(error), deadline_s, RETRY_ENV,
        )

    def recovered(self) -> None:
        if self.since is None:  # the common case, without taking the lock
            return
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            log.info("S3 endpoint %s is answering again after %.1f s", self.endpoint, time.monotonic() - since)


_outages: dict[str, _Outage] = {}
_outages_lock = threading.Lock()


def _outage(endpoint: str) -> _Outage:
    outage = _outages.get(endpoint)
    if outage is None:
        with _outages_lock:
            outage = _outages.setdefault(endpoint, _Outage(endpoint))
    return outage


# A shorter deadline for the calls of one block (see retry_deadline).
_deadline_override: contextvars.ContextVar[float | None] = contextvars.ContextVar("store_retry_deadline", default=None)


@contextmanager
def retry_deadline(seconds: float) -> Iterator[None]:
    """Store calls in this block (this thread or task) give up after `seconds` of failures
    (if that is sooner than the configured deadline): for a read whose caller tries again
    anyway, such as a progress poll, so an outage does not hold it up for minutes."""
    token = _deadline_override.set(seconds)
    try:
        yield
    finally:
        _deadline_override.reset(token)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float = DEFAULT_DEADLINE_S
    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S

    def backoff(self, attempt: int) -> float:
        """Capped exponential backoff with jitter: a random half to all of base * 2^attempt."""
        return min(self.cap_s, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)

    def call(
        self,
        operation: Callable[[], T],
        endpoint: str,
        what: str,
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """operation() until it returns or raises an error that is not transient. Transient
        errors are retried until `deadline_s` after the first one, then OutageTooLong is raised.
        `on_retry` runs before each new attempt (e.g. to drop a broken response)."""
        outage = _outage(endpoint)
        override = _deadline_override.get()
        deadline_s = self.deadline_s if override is None else min(override, self.deadline_s)
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                result = operation()
            except Exception as error:
                if not is_transient(error):
                    raise
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    outage.failed(error, what, deadline_s)
                left = first_failure + deadline_s - now
                if left <= 0:
                    raise OutageTooLong(error, now - first_failure, deadline_s) from error
                log.debug("%s failed (%s); retrying", what, one_line(error))
                time.sleep(min(left, self.backoff(attempt)))
                attempt += 1
                if on_retry is not None:
                    on_retry()
                continue
            outage.recovered()
            return result
