"""Exposing the server: a non-loopback address needs --auth keys, or --insecure (said at start and
in a gauge), and /metrics stays on loopback unless told otherwise."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agentrun_server._server import is_loopback

from ..processes import ServerProcess, free_port


def _serve(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    db = f"sqlite:///{tmp_path / 'agentrun.db'}"
    command = [sys.executable, "-m", "agentrun._cli", "serve", "--db", db, "--port", "0"]
    return subprocess.run(
        [*command, "--metrics-port", "-1", "--web-port", "-1", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _outward_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if is_loopback(address) or address == "0.0.0.0" else address


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("no-such-host.invalid", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serving_the_network_without_authentication_is_refused_with_what_to_do(
    tmp_path: Path,
) -> None:
    done = _serve("--host", "0.0.0.0", tmp_path=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("agentrun serve: --host 0.0.0.0: not a loopback address")
    assert "--insecure" in line and "127.0.0.1" in line
    assert "--auth keys" in line and "agentrun keys create admin --scope admin --db" in line
    assert not (tmp_path / "agentrun.db").exists()  # refused before anything was opened


def test_the_console_on_the_network_without_authentication_is_refused_too(
    tmp_path: Path,
) -> None:
    done = _serve("--web-host", "0.0.0.0", "--web-port", "0", tmp_path=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("agentrun serve: --web-host 0.0.0.0: not a loopback address")
    assert "--auth keys" in line and "--insecure" in line
    assert not (tmp_path / "agentrun.db").exists()


def test_insecure_serves_the_network_says_so_and_keeps_metrics_on_loopback(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    server = ServerProcess(
        tmp_path / "agentrun.db",
        None,
        "--host",
        "0.0.0.0",
        "--insecure",
        "--metrics-port",
        str(metrics_port),
    )
    with server:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
            text = page.read().decode()
        assert "agentrun_server_insecure 1.0" in text
        outward = _outward_address()
        if outward is not None:  # gRPC answers there; /metrics does not
            socket.create_connection((outward, server.port), timeout=5).close()
            with pytest.raises(OSError):
                socket.create_connection((outward, metrics_port), timeout=5).close()


def test_a_loopback_server_reports_itself_secure(tmp_path: Path) -> None:
    metrics_port = free_port()
    with (
        ServerProcess(tmp_path / "agentrun.db", None, "--metrics-port", str(metrics_port)),
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page,
    ):
        assert "agentrun_server_insecure 0.0" in page.read().decode()


def test_auth_keys_serves_the_network_checking_keys_and_not_insecure(tmp_path: Path) -> None:
    metrics_port = free_port()
    server = ServerProcess(
        tmp_path / "agentrun.db",
        None,
        "--host",
        "0.0.0.0",
        "--auth",
        "keys",
        "--metrics-port",
        str(metrics_port),
    )
    with server:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
            assert "agentrun_server_insecure 0.0" in page.read().decode()
        done = subprocess.run(
            [sys.executable, "-m", "agentrun._cli", "stats", "--server", server.url],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")},
        )
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr


async def test_metrics_serve_tls_and_basic_auth_from_an_exporter_web_config(
    tmp_path: Path,
) -> None:
    import base64
    import ssl

    import bcrypt

    from agentrun_server import Server, ServerConfig

    from ..certificates import Authority

    ca = Authority(tmp_path / "ca")
    issued = ca.issue("localhost", server=True)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(
        "tls_server_config:\n"
        f"  cert_file: {issued.cert.relative_to(tmp_path)}\n"
        f"  key_file: {issued.key}\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    server = Server(
        ServerConfig(
            db=f"sqlite:///{tmp_path / 'agentrun.db'}",
            port=0,
            metrics_port=0,
            metrics_web_config=str(web),
        )
    )
    await server.start()
    try:
        assert server.metrics_url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(ca.cert))
        url = f"https://localhost:{server.metrics_port}/metrics"

        def scrape(password: str | None) -> tuple[int, str]:
            request = urllib.request.Request(url)
            if password is not None:
                token = base64.b64encode(f"prometheus:{password}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            try:
                with urllib.request.urlopen(request, context=trusted, timeout=10) as page:
                    return page.status, page.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, ""

        assert (await asyncio.to_thread(scrape, None))[0] == 401
        assert (await asyncio.to_thread(scrape, "wrong"))[0] == 401
        status, text = await asyncio.to_thread(scrape, "s3cret")
        assert status == 200 and "agentrun_server_insecure 0.0" in text
        with pytest.raises(OSError):  # plaintext HTTP is not served
            await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{server.metrics_port}/metrics", None, 5
            )
    finally:
        await server.shutdown(grace_seconds=1)


def test_a_bad_metrics_web_config_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: a.pem\nbasic_auth_user: {}\n")
    done = _serve("--metrics-web-config", str(web), tmp_path=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "unknown keys ['basic_auth_user']" in line
