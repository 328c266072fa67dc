"""The committed protobuf stubs match a fresh generation from proto/."""

import pathlib
import subprocess
import sys

from support import repo_root

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(root: pathlib.Path) -> set[str]:
    """Paths, relative to `root`, of the generated modules and their package markers."""
    found = set()
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.name.endswith(GENERATED_SUFFIXES):
            found.add(str(relative))
            found.add(str(relative.parent / "__init__.py"))
    return found


def test_stubs_match_fresh_generation(tmp_path):
    src = repo_root() / "src"
    result = subprocess.run(
        [sys.executable, str(repo_root() / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"gen_proto.py failed: {result.stderr}"

    fresh = generated_files(tmp_path)
    committed = generated_files(src)
    assert fresh, f"gen_proto.py wrote no stubs into {tmp_path}"
    assert sorted(fresh - committed) == [], "generated but not committed; run `make proto`"
    assert sorted(committed - fresh) == [], "committed but no longer generated; delete them"
    stale = sorted(name for name in fresh
                   if (tmp_path / name).read_bytes() != (src / name).read_bytes())
    assert stale == [], f"stale generated files: {', '.join(stale)}; run `make proto`"
