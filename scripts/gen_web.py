"""Copy the web console's third-party scripts (htmx and its server-sent events extension, pinned
in scripts/web/package.json and installed by npm) into
services/agentrun_server/web/static/vendor, where the server serves them (`make gen`). With
--check, fail when a committed copy differs from the pinned package's file (`make gen-check`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "scripts" / "web" / "node_modules"
VENDOR = ROOT / "services" / "agentrun_server" / "web" / "static" / "vendor"
FILES = {
    "htmx.min.js": MODULES / "htmx.org" / "dist" / "htmx.min.js",
    "sse.js": MODULES / "htmx-ext-sse" / "dist" / "sse.min.js",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail on a stale copy")
    check = parser.parse_args().check
    stale = []
    for name, source in FILES.items():
        if not source.exists():
            print(f"gen_web: {source} is missing: run `make install-web`", file=sys.stderr)
            return 1
        target = VENDOR / name
        wanted = source.read_bytes()
        if target.exists() and target.read_bytes() == wanted:
            continue
        if check:
            stale.append(name)
        else:
            VENDOR.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wanted)
            print(f"gen_web: wrote {target.relative_to(ROOT)}")
    if stale:
        print(
            f"gen_web: {', '.join(stale)} differ from scripts/web's packages: run `make gen`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
