"""Why a server that answers cannot be spoken to: a TLS mismatch, named with the setting that
fixes it.

gRPC reports every such failure as UNAVAILABLE with a transport detail (or none at all) and keeps
retrying; a user sees "cannot reach the server" after the connect timeout. When a connection is
not made, `tls_mismatch` opens a TCP connection of its own to the server's first address and tries
the TLS handshakes the channel would: plaintext against TLS, TLS against plaintext, a certificate
from a CA the client does not trust, a certificate that does not name the address.
"""

from __future__ import annotations

import socket
import ssl

from agentrun._connection import Connection
from agentrun.wire.connection import ENV_TLS_CA

PROBE_TIMEOUT_SECONDS = 2.0

# Handshake failures that mean the peer sent something that is not TLS at all.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF", "RECORD_LAYER_FAILURE", "PACKET_LENGTH")


def first_address(target: str) -> tuple[str, int] | None:
    """The first (host, port) of a gRPC target; None for a unix socket or an address without a
    port."""
    if target.startswith("unix:"):
        return None
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target.removeprefix(scheme).lstrip("/")
            if scheme == "dns:" and "/" in target:  # dns://authority/host:port
                target = target.split("/", 1)[1]
    address = target.split(",", 1)[0]
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def _handshake(host: str, port: int, context: ssl.SSLContext, name: str) -> None:
    with (
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_SECONDS) as raw,
        # The handshake inside the block: one that wrap_socket ran and that failed (a server
        # hanging up) left the wrapper unclosed (a ResourceWarning failed CI once).
        context.wrap_socket(raw, server_hostname=name, do_handshake_on_connect=False) as tls,
    ):
        tls.settimeout(PROBE_TIMEOUT_SECONDS)
        tls.do_handshake()


def _speaks_tls(host: str, port: int) -> bool | None:
    """Whether the server answers a TLS handshake (its certificate unchecked); None when no TCP
    connection is made or the probe is inconclusive."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        _handshake(host, port, context, host)
    except ssl.SSLError as exc:
        text = f"{exc.reason} {exc}".upper()
        if any(marker in text for marker in _NOT_TLS):
            return False
        return True if "ALERT" in text else None  # a TLS alert: it speaks TLS, refused us
    except (ConnectionResetError, BrokenPipeError):
        return False  # a plaintext HTTP/2 server hangs up on a ClientHello
    except OSError:
        return None  # no TCP connection: not a TLS question
    return True


def tls_mismatch(connection: Connection) -> str | None:
    """The TLS setting at fault between this client and its server, and the fix, in one phrase;
    None when the server takes no TCP connection (not a TLS matter) or the handshakes the channel
    would make succeed."""
    address = first_address(connection.target)
    if address is None:
        return None
    host, port = address
    speaks = _speaks_tls(host, port)
    if speaks is None:
        return None
    shown = f"{host}:{port}"
    if not connection.uses_tls():
        if not speaks:
            return None
        return (
            f"the server at {shown} speaks TLS and this client does not: use grpcs://{shown} "
            f"(and --tls-ca FILE, or ${ENV_TLS_CA}, when its certificate is from a private CA)"
        )
    if not speaks:
        return (
            f"the server at {shown} does not speak TLS (plaintext gRPC) and this client does: "
            "drop grpcs:// and --tls/--tls-ca, or serve with --tls-cert and --tls-key"
        )
    ca, cert, key = connection.tls_files()
    name = connection.server_name() or host
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert and key:
            context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["h2"])
        _handshake(host, port, context, name)
    except ssl.SSLCertVerificationError as exc:
        why = exc.verify_message or exc.reason or str(exc)
        if "hostname" in why.lower() or "ip address mismatch" in why.lower():
            return (
                f"the server's certificate does not name {name!r} ({why}): connect by a name it "
                "holds, or pass --tls-server-name NAME"
            )
        trusted = f"the CA in {ca}" if ca else "the system's CAs"
        return (
            f"the server's certificate is not signed by {trusted} ({why}): pass --tls-ca FILE "
            f"(${ENV_TLS_CA}), the CA that signed it"
        )
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if "CERTIFICATE_REQUIRED" in reason.upper() and not cert:
            return "the server asks for a client certificate: pass --tls-cert FILE --tls-key FILE"
        return f"the TLS handshake with {shown} failed: {reason}"
    except OSError:
        return None
    return None
