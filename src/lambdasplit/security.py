"""Bearer tokens, TLS contexts and a self-signed CA for trying TLS out."""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import socket
import ssl
from pathlib import Path

from lambdasplit.errors import LambdaSplitError

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def _read_secret_file(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise LambdaSplitError(f"cannot read the {what} {path}: {exc.strerror}") from None


def read_token(path: str | Path | None) -> str | None:
    if path is None:
        return None
    token = _read_secret_file(path, "token file").strip()
    if len(token) < 16:
        raise LambdaSplitError(f"the token in {path} is shorter than 16 characters; use a long random token")
    return token


def token_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer ...` header."""
    presented = header[7:].strip() if header and header.lower().startswith("bearer ") else ""
    return hmac.compare_digest(presented.encode(), token.encode())


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _PassphraseNeeded(Exception):
    """OpenSSL asked for the key's passphrase and none was given."""


def _no_passphrase() -> str:
    raise _PassphraseNeeded


def read_key_password(path: str | Path | None) -> str | None:
    """The passphrase of an encrypted TLS key: the first line of `path` (None: no file)."""
    if path is None:
        return None
    lines = _read_secret_file(path, "TLS key password file").splitlines()
    if not lines or not lines[0]:
        raise LambdaSplitError(f"the TLS key password file {path} is empty (the passphrase is its first line)")
    return lines[0]


def server_ssl_context(cert: str | Path | None, key: str | Path | None, password: str | None = None) -> ssl.SSLContext | None:
    """The server's TLS context. An encrypted key needs `password`: without one it is refused, never
    prompted for (OpenSSL would ask on the terminal in every front end and tensor-parallel rank, and a
    service has no terminal)."""
    if cert is None and key is None:
        if password is not None:
            raise LambdaSplitError("--tls-key-password-file goes with --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise LambdaSplitError("TLS needs both --tls-cert and --tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key), password=password if password is not None else _no_passphrase)
    except _PassphraseNeeded:
        raise LambdaSplitError(f"the TLS key {key} is encrypted: pass a file holding its passphrase with "
                               "--tls-key-password-file F (the server does not prompt for it)") from None
    except (OSError, ssl.SSLError) as exc:  # a missing file's error names neither path: say both
        hint = " (is the passphrase in --tls-key-password-file the key's?)" if password is not None and isinstance(exc, ssl.SSLError) else ""
        raise LambdaSplitError(f"cannot load the TLS certificate {cert} with the key {key}: {exc}{hint}") from None
    return context


def client_ssl_context(ca: str | Path | None) -> ssl.SSLContext:
    """Verifies the server: against `ca` when given, else the system's trusted roots."""
    context = ssl.create_default_context()
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise LambdaSplitError(f"cannot load the CA certificate {ca}: {exc}") from None
    return context


def peer_certificate(host: str, port: int, timeout: float) -> bytes | None:
    """The certificate (DER) a TLS server presents, read without verifying it (for error hints
    only), or None when host:port does not complete a TLS handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                return tls.getpeercert(binary_form=True) or b""
    except (OSError, ValueError):
        return None


def certificate_names(der: bytes) -> list[str]:
    """The host names and addresses a certificate is valid for (its subjectAltName entries)."""
    from cryptography import x509

    try:
        names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return []
    return [*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def make_certificates(out: str | Path, hosts: list[str], days: int = 30) -> dict[str, Path]:
    """A throwaway CA and a server certificate for `hosts`, signed by it (for trying TLS out)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lambdasplit test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server-key.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)
    return paths
