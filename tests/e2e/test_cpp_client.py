"""The C++ client (clients/cpp) against a live server in a subprocess: its example uploader with
real runs (partial success), built by `make build-cpp` (CMake, the code generated from the protos
at build time). Without CMake or gRPC C++ this module skips, unless AGENTRUN_REQUIRE_TOOLCHAINS=1
(CI), where it fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from google.protobuf import json_format

from agentrun import AgentRun, Client
from agentrun._convert import agent_run_to_proto

from ..processes import ServerProcess


def test_the_cpp_uploader_stores_real_runs_and_answers_each(
    cpp_bin: Path, tmp_path: Path, real_runs: list[AgentRun]
) -> None:
    runs = real_runs[-20:]  # the Inspect runs among them: tool calls, reasoning, long outputs
    lines = [json_format.MessageToJson(agent_run_to_proto(r), indent=None) for r in runs]
    lines += [lines[0], '{"id": "no-transcripts"}']  # a duplicate, and an invalid run
    with ServerProcess(tmp_path / "agentrun.db") as server:
        uploaded = subprocess.run(
            [str(cpp_bin / "agentrun-uploader"), "from-cpp"],
            input="\n".join(lines) + "\n",
            env={**os.environ, "AGENTRUN_SERVER": f"grpc://{server.url}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert uploaded.returncode == 1, uploaded.stderr  # one run was rejected
        said = uploaded.stdout.splitlines()
        assert said[0] == "accepted=20 duplicates=1 rejected=1", uploaded.stdout
        assert 'index=21 id="no-transcripts" reason=REJECTION_REASON_INVALID' in said[1]
        with Client(server.url) as client:
            for run in runs:
                assert agent_run_to_proto(client.get_run(run.id)) == agent_run_to_proto(run)
