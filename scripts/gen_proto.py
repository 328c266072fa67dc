"""Generate the Python stubs for proto/ into src/ (or --out DIR).

The generated modules land beside the code that uses them, one package per
proto package version: slotroute/slot/v1 and slotroute/dispatch/v1. They are
committed, and tests/test_proto_fresh.py fails when they differ from a fresh
generation.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import _proto as grpc_tools_proto
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
INIT_TEXT = '"""Generated protobuf and gRPC modules; run `make proto` to regenerate."""\n'


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: pathlib.Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every file under proto/."""
    out.mkdir(parents=True, exist_ok=True)
    well_known = pathlib.Path(grpc_tools_proto.__path__[0])
    files = [str(path.relative_to(PROTO_ROOT)) for path in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed with exit code {status} on {', '.join(files)}")

    for package_dir in {(out / f).parent for f in files}:
        (package_dir / "__init__.py").write_text(INIT_TEXT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "src",
                        help="directory to write the generated packages into (default: src)")
    generate(parser.parse_args().out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
