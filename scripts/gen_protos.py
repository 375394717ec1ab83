"""Generate the Python gRPC code from protos/ into clients/python/agentrun/v1 (`make gen`).

With --check, generate into a temporary directory and fail when the result differs from the
committed code (`make gen-check`), so the committed stubs always match the protos.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "agentrun/v1"
OUT_ROOT = ROOT / "clients" / "python"
INIT = '"""Generated from protos/agentrun/v1 by `make gen`. Do not edit."""\n'


def generate(out_root: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--mypy_out=quiet:{out_root}",
            f"--mypy_grpc_out=quiet:{out_root}",
            *protos,
        ],
        check=True,
    )
    (out_root / PACKAGE / "__init__.py").write_text(INIT)
    (out_root / PACKAGE / "py.typed").write_text("")
    # Messages-only protos get an empty _grpc module: drop it.
    for grpc_file in (out_root / PACKAGE).glob("*_pb2_grpc.py"):
        if "Stub" not in grpc_file.read_text():
            grpc_file.unlink()
            grpc_file.with_suffix(".pyi").unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    target = OUT_ROOT / PACKAGE
    if not args.check:
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        generate(OUT_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / PACKAGE).mkdir(parents=True)
        generate(Path(tmp))
        fresh = Path(tmp) / PACKAGE
        committed = sorted(p.name for p in target.iterdir() if p.name != "__pycache__")
        generated = sorted(p.name for p in fresh.iterdir())
        stale = [] if committed == generated else [f"file list: {committed} != {generated}"]
        _, mismatch, errors = filecmp.cmpfiles(fresh, target, generated, shallow=False)
        stale += mismatch + errors
    if stale:
        print("generated code is stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
