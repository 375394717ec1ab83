"""The server's settings: every field of `ServerConfig` is a flag and an environment variable,
made in one place (`agentrun_server._config.settings()`); a flag wins over its variable, which
wins over the default; a variable that does not parse is named."""

from __future__ import annotations

import dataclasses

import pytest

from agentrun_server import InvalidArgument, ServerConfig
from agentrun_server._cli import parser
from agentrun_server._config import config_from, settings


def _leaves(value: object, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    found = set()
    for f in dataclasses.fields(value):  # type: ignore[arg-type]
        part = getattr(value, f.name)
        if dataclasses.is_dataclass(part):
            found |= _leaves(part, (*path, f.name))
        else:
            found.add((*path, f.name))
    return found


def test_every_field_is_a_flag_and_a_variable_with_help() -> None:
    assert {s.path for s in settings()} == _leaves(ServerConfig())
    assert len({s.flag for s in settings()}) == len({s.env for s in settings()}) == len(settings())
    assert all(s.help for s in settings()), [s.flag for s in settings() if not s.help]
    flags = {s.flag: s for s in settings()}
    # The names users know stay as they were.
    for flag in ("--db", "--tls-cert", "--tls-client-ca", "--db-max-connections", "--only"):
        assert flag in flags
    assert flags["--tls-cert"].env == "AGENTRUN_TLS_CERT"
    assert flags["--max-run-bytes"].path == ("limits", "max_run_bytes")
    assert flags["--work-lease-window"].path == ("work_limits", "lease_window")


def test_a_flag_wins_over_its_variable_which_wins_over_the_default() -> None:
    environ = {"AGENTRUN_PORT": "6000", "AGENTRUN_MAX_RUN_BYTES": "1024", "AGENTRUN_INSECURE": "1"}
    assert config_from(None, {}) == ServerConfig()
    from_env = config_from(None, environ)
    assert (from_env.port, from_env.limits.max_run_bytes, from_env.insecure) == (6000, 1024, True)
    args = parser().parse_args(
        ["serve", "--port", "7000", "--only", "orchestrator", "--live-run-timeout", "60"]
    )
    both = config_from(args, environ)
    assert (both.port, both.services, both.limits.max_run_bytes) == (7000, ("orchestrator",), 1024)
    assert both.limits.live_run_timeout_seconds == 60.0  # the older spelling still taken
    assert ServerConfig.from_env(environ) == from_env


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("AGENTRUN_PORT", "fifty", "AGENTRUN_PORT: 'fifty' is not an integer"),
        ("AGENTRUN_AUTH", "maybe", "AGENTRUN_AUTH: 'maybe'; choose from none, keys"),
        ("AGENTRUN_ONLY", "both", "AGENTRUN_ONLY: 'both'; choose from ingestion, orchestrator"),
        ("AGENTRUN_INSECURE", "perhaps", "AGENTRUN_INSECURE: 'perhaps' is not a boolean"),
    ],
)
def test_a_variable_that_does_not_parse_is_named(variable: str, value: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        config_from(None, {variable: value})
