"""Unit tests of the policies written once: the fstab command line, transport-error reasons and
their types, and the image field lists that must partition Glance's schema.
"""

from __future__ import annotations

import itertools
import ssl

import pytest

import glancefs
from glancefs import CertificateError, ConnectError, Image
from glancefs._exceptions import connect_error, transport_reason
from glancefs.fs import xattrs
from glancefs.fs.fstab import mount_argv

COMMANDS = frozenset({"mount", "umount"})


class TestFstab:
    @pytest.mark.parametrize(
        ("argv", "expected"),
        [
            (["prod", "/mnt/g", "-o", "ro"], ["mount", "/mnt/g", "-o", "ro", "--os-cloud", "prod"]),
            (["none", "/mnt/g", "-o", "ro"], ["mount", "/mnt/g", "-o", "ro"]),
            (["glancefs", "/mnt/g"], ["mount", "/mnt/g"]),
        ],
    )
    def test_an_fstab_line_becomes_a_mount_command(
        self, argv: list[str], expected: list[str]
    ) -> None:
        assert mount_argv(argv, COMMANDS) == expected

    @pytest.mark.parametrize(
        "argv",
        [["mount", "/mnt/g"], ["umount", "/mnt/g"], ["--help"], ["-h", "x"], ["prod"], []],
    )
    def test_glancefs_own_command_lines_are_left_alone(self, argv: list[str]) -> None:
        assert mount_argv(argv, COMMANDS) == argv


def _chained(*errors: BaseException) -> BaseException:
    """errors[0] raised from errors[1], raised from errors[2], ..."""
    for outer, inner in itertools.pairwise(errors):
        outer.__cause__ = inner
    return errors[0]


class TestTransportErrors:
    def test_the_innermost_readable_reason_wins(self) -> None:
        error = _chained(
            RuntimeError(""),
            OSError("HTTPConnection(host='127.0.0.1'): Failed: [Errno 111] Connection refused"),
            ConnectionRefusedError(111, "Connection\n refused"),
        )
        assert transport_reason(error) == "[Errno 111] Connection refused"

    def test_a_group_of_one_is_looked_into(self) -> None:
        refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
        group = ExceptionGroup("1 failure", [refused])
        error = _chained(OSError("all attempts to connect to 127.0.0.1:1 failed"), group)
        assert transport_reason(error) == "[Errno 111] Connect call failed ('127.0.0.1', 1)"

    def test_a_reason_without_any_text_is_the_type_name(self) -> None:
        assert transport_reason(_chained(RuntimeError(""), TimeoutError())) == "RuntimeError"

    def test_a_cycle_of_causes_ends(self) -> None:
        first, second = ValueError("first"), ValueError("second")
        first.__context__, second.__context__ = second, first
        assert transport_reason(first) == "second"

    def test_a_refused_certificate_is_told_by_its_type(self) -> None:
        verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] unknown CA")
        error = connect_error("GET /v2/images", _chained(RuntimeError(""), verify))
        assert isinstance(error, CertificateError)
        assert str(error) == "GET /v2/images: [SSL: CERTIFICATE_VERIFY_FAILED] unknown CA"
        # The same words in another error's text do not make it a certificate problem.
        other = connect_error("GET /", OSError("CERTIFICATE_VERIFY_FAILED"))
        assert type(other) is ConnectError

    def test_secrets_are_redacted(self) -> None:
        error = connect_error("Keystone", OSError("token s3cr3t-token refused"), ["s3cr3t-token"])
        assert "s3cr3t" not in str(error)
        assert "{SHA256}" in str(error)

    def test_certificate_error_is_public(self) -> None:
        assert glancefs.CertificateError is CertificateError
        assert issubclass(CertificateError, ConnectError)


class TestImageFields:
    def test_read_only_and_writable_fields_partition_the_schema(self) -> None:
        assert not Image.READ_ONLY_FIELDS & Image.WRITABLE_FIELDS
        assert Image.READ_ONLY_FIELDS | Image.WRITABLE_FIELDS == Image.CORE_FIELDS

    def test_the_filesystem_uses_the_client_s_lists(self) -> None:
        assert xattrs.READ_ONLY_FIELDS == Image.READ_ONLY_FIELDS
        assert xattrs.CORE_WRITABLE == Image.WRITABLE_FIELDS

    def test_every_other_key_is_a_custom_property(self) -> None:
        record = {field: None for field in Image.CORE_FIELDS} | {"os_distro": "debian"}
        assert Image(record).properties == {"os_distro": "debian"}
