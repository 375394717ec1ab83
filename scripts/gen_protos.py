"""Generate the client code from protos/ (`make gen`): Python into clients/python/agentrun/v1, and
TypeScript (protobuf-es, JavaScript with .d.ts) into clients/typescript/src/gen/agentrun/v1.

With --check, generate into a temporary directory and fail when the result differs from the
committed code (`make gen-check`), so the committed code always matches the protos. The TypeScript
generator comes from clients/typescript/node_modules (`make install-ts` runs `npm ci` when npm is
present); without it the TypeScript code is neither generated nor checked, and this says so.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "agentrun/v1"
INIT = '"""Generated from protos/agentrun/v1 by `make gen`. Do not edit."""\n'
PROTOC_GEN_ES = ROOT / "clients" / "typescript" / "node_modules" / ".bin" / "protoc-gen-es"


def _protoc(*args: str) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", *args, *protos],
        check=True,
    )


def generate_python(out_root: Path) -> None:
    bin_dir = Path(sys.executable).parent
    _protoc(
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out=quiet:{out_root}",
        f"--mypy_grpc_out=quiet:{out_root}",
    )
    (out_root / PACKAGE / "__init__.py").write_text(INIT)
    (out_root / PACKAGE / "py.typed").write_text("")
    # Messages-only protos get an empty _grpc module: drop it.
    for grpc_file in (out_root / PACKAGE).glob("*_pb2_grpc.py"):
        if "Stub" not in grpc_file.read_text():
            grpc_file.unlink()
            grpc_file.with_suffix(".pyi").unlink(missing_ok=True)


def generate_typescript(out_root: Path) -> None:
    _protoc(
        f"--plugin=protoc-gen-es={PROTOC_GEN_ES}",
        f"--es_out={out_root}",
        "--es_opt=target=js+dts,import_extension=js",
    )


TARGETS: dict[str, tuple[Path, Callable[[Path], None]]] = {
    "python": (ROOT / "clients" / "python", generate_python),
    "typescript": (ROOT / "clients" / "typescript" / "src" / "gen", generate_typescript),
}


def stale_files(out_root: Path, generate: Callable[[Path], None]) -> list[str]:
    """What differs between the committed code and a fresh generation."""
    target = out_root / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / PACKAGE).mkdir(parents=True)
        generate(Path(tmp))
        fresh = Path(tmp) / PACKAGE
        committed = sorted(p.name for p in target.iterdir() if p.name != "__pycache__")
        generated = sorted(p.name for p in fresh.iterdir())
        stale = [] if committed == generated else [f"file list: {committed} != {generated}"]
        _, mismatch, errors = filecmp.cmpfiles(fresh, target, generated, shallow=False)
    return stale + [str(target / name) for name in mismatch + errors]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    stale = []
    for language, (out_root, generate) in TARGETS.items():
        if language == "typescript" and not PROTOC_GEN_ES.exists():
            print(f"typescript: skipped, no {PROTOC_GEN_ES.relative_to(ROOT)} (npm ci)")
            continue
        if args.check:
            stale += stale_files(out_root, generate)
            continue
        target = out_root / PACKAGE
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        generate(out_root)
    if stale:
        print("generated code is stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    if args.check:
        print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
