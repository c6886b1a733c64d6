"""The certificate expiry read from PEM (service.api.tls_files.not_after) against
openssl's own reading, for both of X.509's time forms."""

from __future__ import annotations

import calendar
import subprocess
import time
from pathlib import Path

import pytest

from service.api.tls_files import not_after


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
    key, request = tmp_path / "key.pem", tmp_path / "request.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=x", "-keyout", str(key), "-out", str(request)],
        check=True, capture_output=True,
    )  # fmt: skip
    (tmp_path / "index.txt").touch()
    (tmp_path / "serial").write_text("01\n")
    (tmp_path / "ca.cnf").write_text(
        "[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nnew_certs_dir=.\nserial=serial\n"
        "default_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n"
    )
    cert = tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", str(key),
         "-in", str(request), "-startdate", "590101000000Z", "-enddate", "600102000000Z",
         "-out", str(cert)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    assert not_after(cert.read_bytes()) == _openssl_end_date(cert) < 0  # 1960
