"""TLS files read without serving anything: whether a certificate and key load
together, and when a certificate expires. Apart from service.api.tls because the CLI
checks the files before the metrics' multiprocess folder exists, and that module imports
service.metrics (imported earlier, prometheus-client keeps its values in memory, which
the /metrics of the workers never read)."""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

FILES = "CNNSERVE_TLS_CERTFILE and CNNSERVE_TLS_KEYFILE"


class _EncryptedKey(Exception):
    """The TLS key asked for a passphrase."""


def _no_passphrase() -> str:
    raise _EncryptedKey


def load_problem(
    certfile: Path, keyfile: Path, context: ssl.SSLContext | None = None
) -> str | None:
    """Load the pair into ``context`` (by default a new one, to check it): why it does
    not load, in one line, or None."""
    if context is None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # A passphrase callback that refuses: without one OpenSSL prompts on the terminal
        # (start-up hung there), and gRPC cannot take an encrypted key anyway.
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except _EncryptedKey:
        return (
            f"TLS key {keyfile} is encrypted (it asks for a passphrase); give "
            "CNNSERVE_TLS_KEYFILE an unencrypted key, e.g. from `openssl pkey -in "
            f"{keyfile} -out key.pem`, kept in a secret"
        )
    except (OSError, ssl.SSLError) as exc:
        return (
            f"TLS certificate {certfile} with key {keyfile} cannot be loaded "
            f"({exc.strerror or exc}{_which_file(certfile, keyfile)}); check {FILES}"
        )
    return None


def _which_file(certfile: Path, keyfile: Path) -> str:
    """Which of the two is not what it should be, when one is not PEM of its kind
    (OpenSSL's "PEM lib" named neither: a DER or PKCS#12 file, an empty one, the two
    swapped), as "; ..." to add to the reason; "" when both look right (a mismatch)."""
    try:
        cert, key = certfile.read_bytes(), keyfile.read_bytes()
    except OSError:
        return ""  # the reason already says which cannot be read
    wrong = []
    if not _PEM_CERTIFICATE.search(cert):
        wrong.append(f"{certfile} holds no PEM certificate")
    if not re.search(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----", key):
        wrong.append(f"{keyfile} holds no PEM private key")
    if not wrong:
        return ""
    return "; " + " and ".join(wrong) + " (PEM text is expected: -----BEGIN ...)"


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL
)


def not_after(pem: bytes) -> float | None:
    """When the first certificate of a PEM chain (the server's own) expires, as a Unix
    time; None if it cannot be read."""
    times = validity(pem)
    return None if times is None else times[1]


def validity(pem: bytes) -> tuple[float, float] | None:
    """When the first certificate of a PEM chain (the server's own) begins and ends to
    be valid (notBefore, notAfter), as Unix times; None if it cannot be read. The
    standard library loads certificates but has no public reader of their dates: this
    walks the few DER elements in front of them."""
    found = _PEM_CERTIFICATE.search(pem)
    if found is None:
        return None
    try:
        der = base64.b64decode(found.group(1), validate=False)
        _, start, end = next(_elements(der, 0, len(der)))  # Certificate
        _, start, end = next(_elements(der, start, end))  # TBSCertificate
        fields = [(tag, s, e) for tag, s, e in _elements(der, start, end)]
        if fields and fields[0][0] == 0xA0:  # [0] version, when not v1
            fields = fields[1:]
        _, start, end = fields[3]  # serial, signature, issuer, validity
        begins, ends = list(_elements(der, start, end))[:2]
        return _time(der, *begins), _time(der, *ends)
    except (binascii.Error, StopIteration, IndexError, KeyError, ValueError):
        return None


def _time(der: bytes, tag: int, start: int, end: int) -> float:
    """A DER UTCTime or GeneralizedTime as a Unix time."""
    text = der[start:end].decode("ascii")
    layout = {0x17: "%y%m%d%H%M%SZ", 0x18: "%Y%m%d%H%M%SZ"}[tag]
    when = datetime.strptime(text, layout).replace(tzinfo=UTC)
    if tag == 0x17 and when.year >= 2050:  # RFC 5280: UTCTime's 50-99 are 1950-1999
        when = when.replace(year=when.year - 100)
    return when.timestamp()


def _elements(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER element in ``der[start:end]``."""
    at = start
    while at + 2 <= end:
        tag, length = der[at], der[at + 1]
        at += 2
        if length & 0x80:
            size = length & 0x7F
            length = int.from_bytes(der[at : at + size], "big")
            at += size
        if at + length > end:
            raise ValueError("a DER element runs past its parent")
        yield tag, at, at + length
        at += length
