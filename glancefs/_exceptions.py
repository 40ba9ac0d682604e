"""The errors the Glance client raises.

Every error is a :class:`GlanceError`, and its ``str()`` is one line of clean text that is safe to
log or show to a user: never HTML, never JSON, never a token. Errors that Glance answered carry the
HTTP status and the request id Glance logged, so an operator can find the request in its logs::

    GlanceError
    ├── TransportError ............ Glance could not be reached or did not answer in time
    │   ├── ConnectError
    │   │   └── CertificateError .. the server's TLS certificate is not trusted
    │   └── Timeout
    ├── HTTPError ................. Glance answered an error status (.status, .request_id)
    │   ├── BadRequest ............ 400: malformed request or invalid value
    │   │   └── RangesRefused ..... 400 to a ranged read: the image's store serves whole images only
    │   ├── Unauthorized .......... 401: the token is missing, expired or revoked
    │   ├── Forbidden ............. 403: policy refuses (read-only field, protected image, ...)
    │   ├── NotFound .............. 404
    │   ├── Conflict .............. 409: wrong state (upload to an active image, ...)
    │   ├── OverLimit ............. 413: quota or size cap exceeded
    │   │   └── QuotaExceeded ..... 413 of a unified limit (Keystone): .resource names it
    │   ├── UnsupportedMediaType .. 415: wrong content type, or data refused by format inspection
    │   ├── RangeNotSatisfiable ... 416: read starts at or past the end of the data
    │   └── ServerError ........... 5xx
    │       └── ServiceUnavailable  503
    ├── IntegrityError ............ downloaded data does not match the image's checksum
    └── AuthError ................. credentials could not be turned into a token (Keystone)

Pitfalls: Glance reports a refused upload (format inspection) as 415 and a size cap or a full store
as 413 only once the whole body was sent: callers must wait for the answer before declaring
success. A unified limit (:class:`QuotaExceeded`) is checked when a request starts, so its 413
may come while the body is still being sent; Glance's message for it is a paragraph with the
project's id, which the error reduces to the limit and its figures.
"""

from __future__ import annotations

import hashlib
import html
import re
import ssl
from collections.abc import Iterable, Iterator

__all__ = [
    "AuthError",
    "BadRequest",
    "CertificateError",
    "Conflict",
    "ConnectError",
    "Forbidden",
    "GlanceError",
    "HTTPError",
    "IntegrityError",
    "NotFound",
    "OverLimit",
    "QuotaExceeded",
    "RangeNotSatisfiable",
    "RangesRefused",
    "ServerError",
    "ServiceUnavailable",
    "Timeout",
    "TransportError",
    "Unauthorized",
    "UnsupportedMediaType",
    "connect_error",
    "error_for_status",
    "transport_reason",
]


class GlanceError(Exception):
    """Base of every error the client raises; ``str()`` is one line of clean text."""


class TransportError(GlanceError):
    """Glance could not be reached, or stopped answering (after any retries)."""


class ConnectError(TransportError):
    """The connection to Glance could not be made (refused, DNS, TLS handshake)."""


class CertificateError(ConnectError):
    """The server's TLS certificate could not be verified (unknown CA, wrong host name)."""


class Timeout(TransportError):
    """Glance did not answer within the configured timeout."""


class AuthError(GlanceError):
    """The credentials could not be turned into a token, or no image endpoint was found."""


class IntegrityError(GlanceError):
    """Downloaded data does not match the checksum Glance recorded for the image."""


class HTTPError(GlanceError):
    """Glance answered with an error status.

    ``status`` is the HTTP status, ``request_id`` Glance's ``x-openstack-request-id`` (or None) and
    ``detail`` Glance's own explanation, stripped of markup.
    """

    status: int = 0

    def __init__(self, status: int, detail: str, request_id: str | None = None) -> None:
        self.status = status
        self.detail = detail
        self.request_id = request_id
        text = f"{status} {detail}" if detail else str(status)
        if request_id:
            text += f" (request {request_id})"
        super().__init__(text)


class BadRequest(HTTPError):
    """400: the request or a value in it is invalid."""


class RangesRefused(BadRequest):
    """400 to a ranged download: the image's store can only send the whole image from its start.

    glance_store's rbd, swift and s3 drivers declare no random access, so on Ceph RBD and Swift,
    the stores most clouds run, every ``Range`` request is refused; only the file and cinder
    stores take ranges. A download from offset 0 without a length still works.
    """


class Unauthorized(HTTPError):
    """401: the token is missing, expired or revoked."""


class Forbidden(HTTPError):
    """403: the policy refuses (read-only field, protected image, another project's image)."""


class NotFound(HTTPError):
    """404: no such image (or other resource), or not visible to this project."""


class Conflict(HTTPError):
    """409: the resource is in the wrong state for this request."""


class OverLimit(HTTPError):
    """413: a quota or a size cap was exceeded."""


class QuotaExceeded(OverLimit):
    """413 of one of the project's unified limits, which Glance (23 and later, with
    ``use_keystone_limits``) reads from Keystone: the request would take the project past it.

    ``resource`` names the limit: ``image_count_total`` (images), ``image_count_uploading``
    (images being uploaded or staged), ``image_size_total`` or ``image_stage_total`` (MiB of
    image data, of staged data). ``limit``, ``usage`` and ``delta`` (what the request would add;
    0 for an upload whose size was not sent) are Glance's figures, sizes in MiB. ``str()`` says
    them in one line: ``413 quota image_size_total exceeded: limit 64 MiB, in use 70 MiB``.
    """

    def __init__(
        self,
        status: int,
        resource: str,
        limit: int,
        usage: int,
        delta: int,
        request_id: str | None = None,
    ) -> None:
        self.resource = resource
        self.limit = limit
        self.usage = usage
        self.delta = delta
        unit = " MiB" if resource in _SIZE_LIMITS else ""
        detail = f"quota {resource} exceeded: limit {limit}{unit}, in use {usage}{unit}"
        if delta:
            detail += f", the request adds {delta}{unit}"
        super().__init__(status, detail, request_id)


#: The unified limits that count MiB (the others count images).
_SIZE_LIMITS = frozenset({"image_size_total", "image_stage_total"})
#: How oslo.limit names the limit a request would exceed, inside Glance's 413 message.
_OVER_LIMIT = re.compile(
    r"Resource (?P<resource>\w+) is over limit of (?P<limit>-?\d+) due to current usage "
    r"(?P<usage>-?\d+) and delta (?P<delta>-?\d+)"
)


class UnsupportedMediaType(HTTPError):
    """415: wrong content type, or Glance's format inspection refused the uploaded data."""


class RangeNotSatisfiable(HTTPError):
    """416: the requested range starts at or past the end of the image data."""


class ServerError(HTTPError):
    """5xx: Glance failed."""


class ServiceUnavailable(ServerError):
    """503: Glance is overloaded or a backend is down; worth retrying."""


_BY_STATUS: dict[int, type[HTTPError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: OverLimit,
    415: UnsupportedMediaType,
    416: RangeNotSatisfiable,
    503: ServiceUnavailable,
}

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def clean_text(text: str, limit: int = 300) -> str:
    """Reduce an error body (HTML or text) to one short line: no tags, no entities, no newlines."""
    line = _SPACE.sub(" ", html.unescape(_TAG.sub(" ", text))).strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` on one line with each secret replaced by ``{SHA256}<hash prefix>``, as
    keystoneauth1 does (the hash lets two log lines be matched without showing the secret).

    Secrets under 4 characters are left alone: replacing them would garble every message they
    happen to occur in, and they protect nothing anyway.
    """
    text = " ".join(text.split())
    for secret in secrets:
        if len(secret) >= 4 and secret in text:
            digest = hashlib.sha256(secret.encode()).hexdigest()[:16]
            text = text.replace(secret, "{SHA256}" + digest)
    return text


#: Statuses that say "try again later": a proxy or load balancer without a healthy backend.
RETRY_STATUSES = frozenset({502, 503, 504})


def is_retryable(error: GlanceError) -> bool:
    """True for failures that may pass when the same idempotent request is sent again later."""
    if isinstance(error, TransportError):
        return True
    return isinstance(error, HTTPError) and error.status in RETRY_STATUSES


def transport_reason(error: BaseException) -> str:
    """The innermost readable reason of a transport failure, on one line: ``[Errno 111]
    Connection refused``, ``[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ...``.

    Wrappers have empty messages (httpx's and httpcore's ConnectError, trio's BrokenResourceError
    around an ``ssl.SSLCertVerificationError``) or long ones that repeat their cause with object
    reprs (requests and urllib3 under keystoneauth1): the innermost message says it best.
    """
    best = error
    for inner in _causes(error):
        if str(inner):
            best = inner
    return " ".join(str(best).split()) or type(best).__name__


def connect_error(context: str, error: BaseException, secrets: Iterable[str] = ()) -> ConnectError:
    """The error for a connection that could not be made, ``"{context}: {reason}"`` with the
    ``secrets`` redacted: a :class:`CertificateError` when, somewhere in the chain of causes, the
    server's certificate was refused (told from the exception type, never from its text).
    """
    refused = any(isinstance(e, ssl.SSLCertVerificationError) for e in _causes(error))
    cls = CertificateError if refused else ConnectError
    return cls(redact(f"{context}: {transport_reason(error)}", secrets))


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and its causes (or contexts), outermost first; each exception once.

    A group of one exception (trio's "all attempts to connect failed" has one per address) goes
    on into that exception.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup) and len(current.exceptions) == 1:
            current = current.exceptions[0]
        else:
            current = current.__cause__ or current.__context__


def error_for_status(status: int, detail: str, request_id: str | None = None) -> HTTPError:
    """The typed error for an HTTP error ``status``; ``detail`` is cleaned to one line, and a
    413 that names a unified limit is a :class:`QuotaExceeded` saying only that limit."""
    over = _OVER_LIMIT.search(detail) if status == 413 else None
    if over is not None:
        figures = (int(over["limit"]), int(over["usage"]), int(over["delta"]))
        return QuotaExceeded(status, over["resource"], *figures, request_id=request_id)
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else HTTPError)
    return cls(status, clean_text(detail), request_id)
