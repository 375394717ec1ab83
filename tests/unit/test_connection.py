"""The client's Connection: targets, when TLS turns on, and the API key never sent in the clear."""

from __future__ import annotations

import pytest

from agentrun import Connection, ConnectionConfigError
from agentrun._connection import is_loopback_target, resolve_server


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AGENTRUN_SERVER",
        "AGENTRUN_API_KEY",
        "AGENTRUN_TLS",
        "AGENTRUN_TLS_CA",
        "AGENTRUN_TLS_CERT",
        "AGENTRUN_TLS_KEY",
        "AGENTRUN_TLS_SERVER_NAME",
    ):
        monkeypatch.delenv(name, raising=False)


def test_a_server_url_names_one_server_or_replicas_to_balance_over() -> None:
    assert resolve_server("127.0.0.1:50051") == ("127.0.0.1:50051", None)
    assert resolve_server("grpc://127.0.0.1:50051") == ("127.0.0.1:50051", False)
    assert resolve_server("grpcs://agentrun.example:443") == ("agentrun.example:443", True)
    assert resolve_server("10.0.0.1:50051,10.0.0.2:50051") == (
        "ipv4:10.0.0.1:50051,10.0.0.2:50051",
        None,
    )
    assert resolve_server("dns:///agentrun.internal:50051") == (
        "dns:///agentrun.internal:50051",
        None,
    )


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("unix:/tmp/agentrun.sock", True),
        ("10.0.0.1:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.2:2", False),
        ("dns:///agentrun.internal:50051", False),
        ("agentrun.example:443", False),
        ("[2001:db8::1]:50051", False),
    ],
)
def test_only_this_machines_addresses_count_as_loopback(target: str, local: bool) -> None:
    assert is_loopback_target(target) is local


def test_no_key_and_no_tls_setting_is_plaintext() -> None:
    assert Connection("10.0.0.1:50051").credentials() is None


def test_a_key_to_another_machine_turns_tls_on_as_temporal_does() -> None:
    assert Connection("agentrun.example:443", api_key="ark_x").credentials() is not None


def test_a_key_to_this_machine_stays_plaintext() -> None:
    connection = Connection("127.0.0.1:50051", api_key="ark_x")
    assert connection.credentials() is None
    assert connection.call_metadata() == (("authorization", "Bearer ark_x"),)


def test_a_key_is_never_sent_in_plaintext_to_another_machine_unless_allowed() -> None:
    with pytest.raises(ConnectionConfigError, match=r"plaintext to 10\.0\.0\.1:50051"):
        Connection("grpc://10.0.0.1:50051", api_key="ark_x").credentials()
    with pytest.raises(ConnectionConfigError, match="plaintext"):
        Connection("10.0.0.1:50051", api_key="ark_x", tls=False).credentials()
    allowed = Connection("10.0.0.1:50051", api_key="ark_x", tls=False, allow_plaintext_key=True)
    assert allowed.credentials() is None


def test_the_environment_fills_what_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTRUN_SERVER", "10.0.0.9:1234")
    monkeypatch.setenv("AGENTRUN_API_KEY", "ark_env")
    connection = Connection(metadata=(("x-team", "evals"),))
    assert connection.target == "10.0.0.9:1234"
    assert connection.call_metadata() == (("authorization", "Bearer ark_env"), ("x-team", "evals"))
    assert connection.credentials() is not None  # a key to another machine: TLS
    monkeypatch.setenv("AGENTRUN_TLS", "maybe")
    with pytest.raises(ConnectionConfigError, match="AGENTRUN_TLS"):
        connection.credentials()


def test_half_a_client_certificate_is_refused(tmp_path: object) -> None:
    with pytest.raises(ConnectionConfigError, match="give both"):
        Connection("127.0.0.1:1", tls=True, tls_cert_file="cert.pem").credentials()
    with pytest.raises(ConnectionConfigError, match=r"tls_ca_file /nonexistent/ca\.pem"):
        Connection("127.0.0.1:1", tls_ca_file="/nonexistent/ca.pem").credentials()


def test_the_repr_of_a_connection_redacts_its_key_and_secret_metadata() -> None:
    connection = Connection(
        "grpcs://agentrun.internal:50051",
        api_key="ark_secret-token",
        metadata=(("x-api-key", "another-secret"), ("x-team", "evals")),
    )
    shown = repr(connection)
    assert "ark_secret-token" not in shown and "another-secret" not in shown
    assert "api_key='<redacted>'" in shown and "('x-team', 'evals')" in shown
    assert "agentrun.internal" in shown
    assert "api_key=None" in repr(Connection("127.0.0.1:50051"))
