"""glancefs: an OpenStack Glance image service as a filesystem, and the async client under it.

The client (``glancefs.Client``) speaks the Glance v2 API on trio and httpx; the filesystem
(``glancefs mount``) is built on it. Everything public is re-exported here; the modules with a
leading underscore are implementation, and :mod:`glancefs.plumbing` holds the client's helpers that
only the filesystem and the CLI use.
"""

from ._auth import Auth, SessionAuth, TokenAuth
from ._client import Client, RequestEvent
from ._exceptions import (
    AuthError,
    BadRequest,
    CertificateError,
    Conflict,
    ConnectError,
    Forbidden,
    GlanceError,
    HTTPError,
    IntegrityError,
    NotFound,
    OverLimit,
    QuotaExceeded,
    RangeNotSatisfiable,
    RangesRefused,
    ServerError,
    ServiceUnavailable,
    Timeout,
    TransportError,
    Unauthorized,
    UnsupportedMediaType,
)
from ._images import Image, ImageData
from ._members import Member
from ._metadefs import MetadefObject, MetadefProperty, MetadefTag, Namespace, ResourceType
from ._records import Record
from ._schemas import Schema
from ._tasks import Task
from ._version import __version__

__all__ = [
    "Auth",
    "AuthError",
    "BadRequest",
    "CertificateError",
    "Client",
    "Conflict",
    "ConnectError",
    "Forbidden",
    "GlanceError",
    "HTTPError",
    "Image",
    "ImageData",
    "IntegrityError",
    "Member",
    "MetadefObject",
    "MetadefProperty",
    "MetadefTag",
    "Namespace",
    "NotFound",
    "OverLimit",
    "QuotaExceeded",
    "RangeNotSatisfiable",
    "RangesRefused",
    "Record",
    "RequestEvent",
    "ResourceType",
    "Schema",
    "ServerError",
    "ServiceUnavailable",
    "SessionAuth",
    "Task",
    "Timeout",
    "TokenAuth",
    "TransportError",
    "Unauthorized",
    "UnsupportedMediaType",
    "__version__",
]
