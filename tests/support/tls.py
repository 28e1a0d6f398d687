"""Certificates for TLS tests, made with the openssl command line.

`make_pki` writes a test CA, a broker certificate for 127.0.0.1 and localhost (PEM, and
as a PKCS12 keystore for a Java broker), a client certificate signed by the same CA, and
a second, unrelated CA that trusts nothing of the above (for "untrusted certificate"
tests). Keys are P-256 EC, certificates valid for two days.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "make_pki"]

KEYSTORE_PASSWORD = "fleetscope-test"  # the PKCS12 keystore's; the keys themselves are test-only


@dataclass(frozen=True)
class Pki:
    """Paths of the generated files."""

    ca_cert: Path  # PEM CA certificate: clients' kafka_ssl_cafile, the broker's truststore
    broker_cert: Path  # PEM
    broker_key: Path  # PEM, unencrypted PKCS#8
    broker_keystore: Path  # PKCS12 with the broker key, its certificate and the CA
    keystore_password: str
    client_cert: Path  # PEM, signed by ca_cert, for TLS client authentication
    client_key: Path
    other_ca_cert: Path  # a CA that signed none of these


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key.name, "-out", cert.name, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (directory / f"{name}{s}" for s in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial",
        "-out", cert.name, "-days", "2", "-extfile", ext.name,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Generate the CA, broker, client and second-CA files under directory."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "fleetscope-test-ca")
    broker = _leaf(directory, "broker", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client = _leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    other_ca, _ = _ca(directory, "other-ca")
    keystore = directory / "broker.p12"
    _openssl(
        "pkcs12", "-export", "-in", broker[0].name, "-inkey", broker[1].name, "-certfile", ca[0].name,
        "-name", "broker", "-out", keystore.name, "-passout", f"pass:{KEYSTORE_PASSWORD}",
        cwd=directory,
    )  # fmt: skip
    return Pki(ca[0], broker[0], broker[1], keystore, KEYSTORE_PASSWORD, client[0], client[1], other_ca)
