"""Regenerate the committed Python code for ``protos/perspective/v1/*.proto``.

The generated modules live inside our own package (``shared_model.wire.perspective.v1``)
rather than a generic top-level ``perspective`` module, so protoc's absolute imports
(``from perspective.v1 import x_pb2``) are rewritten to the package path.

Usage:
    python protos/generate.py            # write shared_model/wire/perspective/v1/
    python protos/generate.py --check    # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "shared_model" / "wire"
PACKAGE_PREFIX = "shared_model.wire."
_IMPORT_RE = re.compile(r"^(from|import) perspective\.v1", re.MULTILINE)


def generate(dest: Path) -> dict[str, str]:
    """Run protoc into ``dest`` and return ``{relative path: rewritten source}``."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={dest}",
        f"--pyi_out={dest}",
        f"--grpc_python_out={dest}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see messages above)")
    files: dict[str, str] = {}
    for path in sorted(dest.rglob("*.py*")):
        text = _IMPORT_RE.sub(
            lambda m: f"{m.group(1)} {PACKAGE_PREFIX}perspective.v1", path.read_text()
        )
        files[str(path.relative_to(dest))] = text
    return files


def main() -> int:
    """Generate or check; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
    stale = [rel for rel, text in files.items() if _read(OUT_ROOT / rel) != text]
    if args.check:
        for rel in stale:
            print(f"stale generated file: shared_model/wire/{rel} (run `make protos`)")
        return 1 if stale else 0
    for rel, text in files.items():
        target = OUT_ROOT / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = target.with_suffix(target.suffix + ".tmp")
        tmp_path.write_text(text)
        tmp_path.replace(target)
    for pkg in (OUT_ROOT, OUT_ROOT / "perspective", OUT_ROOT / "perspective" / "v1"):
        (pkg / "__init__.py").touch()
    print(f"wrote {len(files)} files under {OUT_ROOT.relative_to(ROOT)}")
    return 0


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


if __name__ == "__main__":
    sys.exit(main())
