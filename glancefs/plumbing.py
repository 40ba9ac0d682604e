"""The client's helpers that the filesystem (:mod:`glancefs.fs`) and the CLI build on.

Not a stable user API: these follow what ``glancefs mount`` needs and may change with it. A program
that talks to Glance uses the names of :mod:`glancefs` (``glancefs.Client``, the records, the
errors); the filesystem and the CLI import these from here, never from ``glancefs._*``.

* :class:`ConnectionBudget`: the slots every request holds (``Client.connections``), which a
  paused download gives back when others wait;
* :class:`Verifier`: hashing image data against the record's ``os_hash_value`` / ``checksum``;
* :func:`is_retryable`: whether a failed idempotent request may pass when sent again;
* :func:`parse_time`: Glance's timestamps as nanoseconds since the epoch;
* :func:`redact`: secrets out of a line of text;
* :func:`tls_context`: ``--os-cacert``, ``--insecure`` and a client certificate as one TLS setting.
"""

from ._budget import ConnectionBudget
from ._client import tls_context
from ._exceptions import is_retryable, redact
from ._images import parse_time
from ._integrity import Verifier

__all__ = ["ConnectionBudget", "Verifier", "is_retryable", "parse_time", "redact", "tls_context"]
