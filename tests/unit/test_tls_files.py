"""The certificate expiry read from PEM (service.api.tls_files.not_after) against
openssl's own reading, for both of X.509's time forms."""

from __future__ import annotations

import calendar
import subprocess
import time
from pathlib import Path

import pytest

from service.api.tls_files import load_problem, not_after, validity
from tests.helpers.server import dated_certificate, self_signed


def _certificate(folder: Path, days: int) -> Path:
    cert = folder / f"{days}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", str(days), "-subj", "/CN=x", "-keyout", str(folder / "key.pem"),
         "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


def _openssl_end_date(cert: Path) -> float:
    out = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-enddate"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    stamp = out.strip().removeprefix("notAfter=")  # "Dec  4 18:09:56 2026 GMT"
    return calendar.timegm(time.strptime(stamp, "%b %d %H:%M:%S %Y %Z"))


@pytest.mark.parametrize("days", [1, 20_000])  # UTCTime; GeneralizedTime after 2049
def test_expiry_is_read_as_openssl_reads_it(tmp_path: Path, days: int) -> None:
    cert = _certificate(tmp_path, days)
    chain = cert.read_bytes() + cert.read_bytes()  # the first certificate is the server's
    assert not_after(chain) == _openssl_end_date(cert)


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",  # runs past its end
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    ],
)
def test_what_is_no_certificate_has_no_expiry(pem: bytes) -> None:
    assert not_after(pem) is None


def test_a_utctime_year_from_50_is_of_the_1900s(tmp_path: Path) -> None:
    """RFC 5280: UTCTime's two-digit years 50-99 are 1950-1999 (strptime's %y: 2050-2068)."""
    cert, _ = dated_certificate(tmp_path, "590101000000Z", "600102000000Z")
    assert not_after(cert.read_bytes()) == _openssl_end_date(cert) < 0  # 1960


def test_validity_reads_both_ends(tmp_path: Path) -> None:
    cert, _ = dated_certificate(tmp_path, "20991231000000Z", "21000101000000Z")
    begins = calendar.timegm((2099, 12, 31, 0, 0, 0))
    assert validity(cert.read_bytes()) == (begins, begins + 86400)


def test_a_pair_that_does_not_load_says_which_file_is_not_pem(tmp_path: Path) -> None:
    """OpenSSL's "[SSL] PEM lib" named neither file: a DER certificate, an empty key and
    the two swapped all read alike."""
    cert, key = self_signed(tmp_path)
    der = tmp_path / "cert.der"
    subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-outform", "DER", "-out", str(der)],
        check=True, capture_output=True,
    )  # fmt: skip
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    problem = load_problem(der, key)
    assert (
        problem
        and f"{der} holds no PEM certificate" in problem
        and str(key) + " holds" not in problem
    )
    problem = load_problem(cert, empty)
    assert problem and f"{empty} holds no PEM private key" in problem
    problem = load_problem(key, cert)  # swapped
    assert (
        problem and "holds no PEM certificate" in problem and "holds no PEM private key" in problem
    )
    other, _ = dated_certificate(tmp_path / "other", "20200101000000Z", "21000101000000Z")
    problem = load_problem(other, key)  # both PEM, not a pair: no file blamed
    assert problem and "holds no" not in problem
