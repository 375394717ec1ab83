"""Write the wire limits (`agentrun.wire.limits`, where they are declared once) for the clients in
other languages (`make gen`): `protos/agentrun/v1/limits.json` for any language's generator, and
`clients/typescript/src/limits.js` with its `.d.ts`. With --check, fail when a committed file
differs from what would be written (`make gen-check`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agentrun.wire import limits

ROOT = Path(__file__).resolve().parent.parent
HEADER = "Generated from agentrun.wire.limits by `make gen` (scripts/gen_limits.py). Do not edit."


def values() -> dict[str, int | float | str]:
    """Every upper-case number of the limits module (and the identifier pattern), by name."""
    found: dict[str, int | float | str] = {}
    for name in sorted(vars(limits)):
        value = getattr(limits, name)
        if name.isupper() and isinstance(value, int | float) and not isinstance(value, bool):
            found[name] = value
    found["IDENTIFIER_PATTERN"] = limits.IDENTIFIER_PATTERN.pattern
    return found


def _js(value: int | float | str) -> str:
    if isinstance(value, str):
        return json.dumps(f"^{value}$")
    return repr(int(value)) if float(value).is_integer() else repr(value)


def files() -> dict[Path, str]:
    found = values()
    as_json = {"comment": HEADER, "limits": found}
    js = [f"// {HEADER}", "// The limits a request must keep; the server answers past one with a"]
    js.append("// status naming it. IDENTIFIER_PATTERN is a RegExp source (workflow, stage and")
    js.append("// pathway names).")
    js += [f"export const {name} = {_js(value)};" for name, value in found.items()]
    dts = [f"// {HEADER}"]
    dts += [
        f"export declare const {name}: {'string' if isinstance(v, str) else 'number'};"
        for name, v in found.items()
    ]
    return {
        ROOT / "protos" / "agentrun" / "v1" / "limits.json": json.dumps(as_json, indent=2) + "\n",
        ROOT / "clients" / "typescript" / "src" / "limits.js": "\n".join(js) + "\n",
        ROOT / "clients" / "typescript" / "src" / "limits.d.ts": "\n".join(dts) + "\n",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a committed file is stale")
    args = parser.parse_args()
    stale = []
    for path, text in files().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
    if stale:
        print("generated limits are stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    if args.check:
        print("generated limits are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
