"""ServerTls: a mismatched pair refused at start, files re-read when they change or on SIGHUP,
a half-written rotation never served."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentrun_server import InvalidArgument, TlsConfig
from agentrun_server.auth import ServerTls

from ..certificates import Authority


def test_a_key_that_is_not_the_certificates_is_refused_at_start(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    one, two = ca.issue("one", server=True), ca.issue("two", server=True)
    with pytest.raises(InvalidArgument, match="not a certificate and its key"):
        ServerTls(TlsConfig(str(one.cert), str(two.key)))
    with pytest.raises(InvalidArgument, match="give both"):
        ServerTls(TlsConfig(str(one.cert)))


def test_changed_files_and_sighup_are_read_at_the_next_handshake(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    issued = ca.issue("localhost", server=True)
    tls = ServerTls(TlsConfig(str(issued.cert), str(issued.key)))
    assert tls._fetch() is None  # nothing changed: gRPC keeps what it has
    tls.reload()  # SIGHUP
    assert tls._fetch() is not None
    assert tls._fetch() is None
    ca.issue("localhost", server=True)  # rewritten in place
    assert tls._fetch() is not None


def test_a_half_written_rotation_keeps_the_last_good_pair(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    issued = ca.issue("localhost", server=True)
    tls = ServerTls(TlsConfig(str(issued.cert), str(issued.key)))
    issued.key.write_text("")  # the key not written yet
    assert tls._fetch() is None
    ca.issue("localhost", server=True)  # the rotation completes
    assert tls._fetch() is not None
