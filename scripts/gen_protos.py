"""Generate the client code from protos/ (`make gen`): Python into clients/python/agentrun/v1,
TypeScript (protobuf-es, JavaScript with .d.ts) into clients/typescript/src/gen/agentrun/v1, and Go
into clients/go/agentrunv1 (buf.gen.yaml). C++ is generated at build time by its CMake project.

With --check, generate into a temporary directory and fail when the result differs from the
committed code (`make gen-check`), so the committed code always matches the protos. The TypeScript
generator comes from clients/typescript/node_modules (`make install-ts` runs `npm ci` when npm is
present), Go's plugins from Debian (`make install-go`); a language whose generator is missing is
neither generated nor checked, and this says so (CI sets AGENTRUN_REQUIRE_TOOLCHAINS=1 to fail
instead).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "agentrun/v1"
INIT = '"""Generated from protos/agentrun/v1 by `make gen`. Do not edit."""\n'
PROTOC_GEN_ES = ROOT / "clients" / "typescript" / "node_modules" / ".bin" / "protoc-gen-es"
BUF = Path(sys.executable).parent / "buf"
GO_PLUGINS = ("protoc-gen-go", "protoc-gen-go-grpc")


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


def generate_go(out_root: Path) -> None:
    # buf.gen.yaml writes below clients/go; out_root stands for clients/go here.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [str(BUF), "generate", "--template", "buf.gen.yaml", "-o", tmp], cwd=ROOT, check=True
        )
        generated = Path(tmp) / "clients" / "go" / "agentrunv1"
        for file in generated.iterdir():
            shutil.copy(file, out_root / "agentrunv1" / file.name)


def _nothing_missing() -> str | None:
    return None


@dataclass(frozen=True)
class Target:
    """Where one language's generated package is committed, how to generate it, and what its
    generator lacks on this machine (None: nothing)."""

    out_root: Path
    package: str
    generate: Callable[[Path], None]
    missing: Callable[[], str | None] = _nothing_missing


def _missing_es() -> str | None:
    if PROTOC_GEN_ES.exists():
        return None
    return f"no {PROTOC_GEN_ES.relative_to(ROOT)} (make install-ts)"


def _missing_go() -> str | None:
    absent = [plugin for plugin in GO_PLUGINS if shutil.which(plugin) is None]
    return f"no {', '.join(absent)} on PATH (make install-go)" if absent else None


TARGETS: dict[str, Target] = {
    "python": Target(ROOT / "clients" / "python", PACKAGE, generate_python),
    "typescript": Target(
        ROOT / "clients" / "typescript" / "src" / "gen", PACKAGE, generate_typescript, _missing_es
    ),
    "go": Target(ROOT / "clients" / "go", "agentrunv1", generate_go, _missing_go),
}


def stale_files(target: Target) -> list[str]:
    """What differs between the committed code and a fresh generation."""
    committed_dir = target.out_root / target.package
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / target.package
        fresh.mkdir(parents=True)
        target.generate(Path(tmp))
        committed = (
            sorted(p.name for p in committed_dir.iterdir() if p.name != "__pycache__")
            if committed_dir.exists()
            else []
        )
        generated = sorted(p.name for p in fresh.iterdir())
        stale = [] if committed == generated else [f"file list: {committed} != {generated}"]
        _, mismatch, errors = filecmp.cmpfiles(fresh, committed_dir, generated, shallow=False)
    return stale + [str(committed_dir / name) for name in mismatch + errors]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    stale = []
    required = os.environ.get("AGENTRUN_REQUIRE_TOOLCHAINS") == "1"
    for language, target in TARGETS.items():
        missing = target.missing()
        if missing:
            if required:
                print(f"{language}: {missing}; AGENTRUN_REQUIRE_TOOLCHAINS=1", file=sys.stderr)
                return 1
            print(f"{language}: skipped, {missing}")
            continue
        if args.check:
            stale += stale_files(target)
            continue
        committed_dir = target.out_root / target.package
        if committed_dir.exists():
            shutil.rmtree(committed_dir)
        committed_dir.mkdir(parents=True)
        target.generate(target.out_root)
    if stale:
        print("generated code is stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    if args.check:
        print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
