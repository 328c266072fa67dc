"""compose.yaml, the Dockerfile and `make run` start the same program with the same config.

No container engine is needed: the compose file is checked against the
compose specification, its commands are parsed with the real CLI parser, and
then run as plain processes with loopback addresses.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import zipfile

import pytest
import tomli_w
import yaml
from support import free_port, repo_root, subprocess_env

from slotroute import cli

ROOT = repo_root()
# The image's working directory; relative paths in compose.yaml start there.
IMAGE_WORKDIR = "/app"


# -- reading the three files ---------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def makefile_variables(text: str) -> dict[str, str]:
    variables = {}
    for match in re.finditer(r"^([A-Z_]+)\s*(?:\?=|:=|=)\s*(.*)$", text, re.MULTILINE):
        variables.setdefault(match.group(1), match.group(2).strip())
    return variables


def expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(10):
        expanded = re.sub(r"\$\((\w+)\)", lambda match: variables.get(match.group(1), ""), text)
        if expanded == text:
            break
        text = expanded
    return text


def make_run_argv() -> list[str]:
    """The command of the Makefile's `run` recipe, variables expanded, without `exec`."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert recipe, "the Makefile has no `run` target with a recipe"
    lines = [line.strip() for line in recipe.group(1).splitlines()]
    assert len(lines) == 1, f"expected one recipe line for `run`, got {lines}"
    argv = shlex.split(expand(lines[0], makefile_variables(text)))
    if argv[0] == "exec":
        argv = argv[1:]
    return argv


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    return [tuple(line.split(None, 1)) for line in logical]


def dockerfile_value(instruction: str) -> str:
    values = [arguments for name, arguments in dockerfile_instructions() if name == instruction]
    assert len(values) == 1, f"expected one {instruction} in the Dockerfile, got {values}"
    return values[0]


def parse(argv: list[str]):
    """Parse arguments with the real CLI parser; argparse exits 2 on an error."""
    return cli.build_parser().parse_args(argv)


def command_of(service: str) -> list[str]:
    command = compose()["services"][service]["command"]
    assert isinstance(command, list), "use the list form, so no shell splits the arguments"
    return [str(item) for item in command]


# -- compose.yaml ---------------------------------------------------------------------------


def test_compose_matches_compose_spec():
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "compose.yaml")],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services():
    services = compose()["services"]

    assert set(services) == {"slotd", "dispatcher"}
    assert services["slotd"]["image"] == services["dispatcher"]["image"]
    assert services["dispatcher"]["depends_on"]["slotd"]["condition"] == "service_healthy"


def test_make_run_command():
    argv = make_run_argv()

    assert argv[0].endswith("/slotroute")
    args = parse(argv[1:])
    assert args.command == "up"
    assert args.config == "examples/box.toml"


@pytest.mark.parametrize("service", ["slotd", "dispatcher"])
def test_compose_command_parses(service):
    args = parse(command_of(service))

    assert args.command == service
    assert args.handler is getattr(cli, f"cmd_{service}")
    # Same config file as `make run`, relative to the image's working directory.
    assert args.config == parse(make_run_argv()[1:]).config
    assert (ROOT / args.config).is_file()
    assert args.allow_insecure_bind is True
    assert args.listen.startswith("0.0.0.0:")


def test_compose_dispatcher_subscribes_to_slotd():
    slotd = parse(command_of("slotd"))
    dispatcher = parse(command_of("dispatcher"))

    assert dispatcher.slotd == [f"slotd:{slotd.listen.rsplit(':', 1)[1]}"]


def test_compose_backend_hosts():
    args = parse(command_of("slotd"))

    assert args.backend_host == "0.0.0.0"
    assert args.advertise_host == "127.0.0.1"


def test_compose_ports_on_loopback_only():
    for name, service in compose()["services"].items():
        for mapping in service["ports"]:
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} beyond loopback"


def test_compose_publishes_service_and_backend_ports():
    box = tomllib.loads((ROOT / "examples" / "box.toml").read_text())
    services = compose()["services"]
    slotd_ports = [str(mapping) for mapping in services["slotd"]["ports"]]
    port_range = box["slotd"]["ports"]

    assert f"127.0.0.1:{port_range}:{port_range}" in slotd_ports
    for name in ("slotd", "dispatcher"):
        port = parse(command_of(name)).listen.rsplit(":", 1)[1]
        assert f"127.0.0.1:{port}:{port}" in [str(mapping) for mapping in services[name]["ports"]]


@pytest.mark.parametrize("service", ["slotd", "dispatcher"])
def test_compose_healthcheck_parses(service):
    test = compose()["services"][service]["healthcheck"]["test"]
    listen_port = parse(command_of(service)).listen.rsplit(":", 1)[1]

    assert test[:2] == ["CMD", "slotroute"]
    args = parse(test[2:])
    assert args.command == "health"
    assert args.address == f"127.0.0.1:{listen_port}"


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_entrypoint_and_cmd():
    entrypoint = json.loads(dockerfile_value("ENTRYPOINT"))
    command = json.loads(dockerfile_value("CMD"))

    assert entrypoint == ["slotroute"]
    args = parse(command)
    assert args.command == "up"
    assert args.config == f"{IMAGE_WORKDIR}/{parse(make_run_argv()[1:]).config}"
    assert args.allow_insecure_bind is True


def test_dockerfile_healthcheck_parses():
    healthcheck = dockerfile_value("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD"):])
    dispatcher_port = parse(json.loads(dockerfile_value("CMD"))).dispatcher_listen.rsplit(":", 1)[1]

    assert command[0] == "slotroute"
    args = parse(command[1:])
    assert args.command == "health"
    assert args.address == f"127.0.0.1:{dispatcher_port}"


def test_dockerfile_base_workdir_user():
    assert dockerfile_value("FROM") == "python:3.11-slim"
    assert dockerfile_value("WORKDIR") == IMAGE_WORKDIR
    assert dockerfile_value("USER") not in ("root", "0")
    install = [arguments for name, arguments in dockerfile_instructions() if name == "RUN"]
    assert any("pip install --no-cache-dir ." in arguments for arguments in install)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether a path is excluded: a pattern matches it or one of its parent directories."""
    import fnmatch

    parts = relative.split("/")
    prefixes = ["/".join(parts[:index]) for index in range(1, len(parts) + 1)]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix.rsplit("/", 1)[-1], bare):
                return True
    return False


def build_context() -> list[str]:
    """Repository files the Dockerfile's COPY lines take, after .dockerignore."""
    patterns = dockerignore_patterns()
    sources: list[str] = []
    for name, arguments in dockerfile_instructions():
        if name == "COPY":
            sources.extend(arguments.split()[:-1])
    files = []
    for source in sources:
        path = ROOT / source
        candidates = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
        for item in candidates:
            relative = item.relative_to(ROOT).as_posix()
            if not ignored(relative, patterns):
                files.append(relative)
    return sorted(files)


def test_image_contains_package_files():
    files = build_context()

    for needed in ("pyproject.toml", "README.md", "src/slotroute/cli.py",
                   "src/slotroute/slot/v1/slot_pb2.py", "src/slotroute/standin/server.py",
                   "examples/box.toml", "examples/models/kokoro-v1.0.onnx"):
        assert needed in files
    assert not [name for name in files if "__pycache__" in name or ".egg-info" in name]


def test_image_package_builds(tmp_path):
    """`pip install .` in the image builds a wheel with the `slotroute` entry point."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here; the wheel build needs it without network")
    context = tmp_path / "context"
    for relative in build_context():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / relative).read_bytes())

    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--quiet", "--wheel-dir", str(tmp_path / "wheels"),
         str(context)],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0 and "invalid command 'bdist_wheel'" in result.stderr:
        pytest.skip("this setuptools cannot build wheels without the `wheel` package")
    assert result.returncode == 0, result.stderr

    (wheel,) = (tmp_path / "wheels").glob("slotroute-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(name).decode() for name in names
                            if name.endswith("entry_points.txt"))
    assert "slotroute = slotroute.cli:main" in entry_points
    assert "slotroute/slot/v1/slot_pb2.py" in names
    assert "slotroute/standin/server.py" in names


# -- running the compose commands -------------------------------------------------------------


def local_config(directory: pathlib.Path, config: str) -> pathlib.Path:
    """Copy a config with its metrics endpoints on free ports.

    The fixed default metrics ports would collide with any other slotroute
    running on this machine; nothing else in the copy changes.
    """
    source = ROOT / config
    document = tomllib.loads(source.read_text())
    for section in ("slotd", "dispatcher"):
        document[section]["metrics_listen"] = "127.0.0.1:0"
    document["slotd"]["cache_dir"] = str((source.parent / document["slotd"]["cache_dir"]).resolve())
    copy = directory / source.name
    copy.write_text(tomli_w.dumps(document))
    return copy


def localize(argv: list[str], ports: dict[str, int], config: pathlib.Path) -> list[str]:
    """Point every address at 127.0.0.1, with a free port standing in for each port."""
    result = []
    for index, item in enumerate(argv):
        match = re.fullmatch(r"[\w.\-]+:(\d+)", item)
        if match and match.group(1) in ports:
            item = f"127.0.0.1:{ports[match.group(1)]}"
        elif item == "0.0.0.0":
            item = "127.0.0.1"
        elif index > 0 and argv[index - 1] == "--config":
            item = str(config)
        result.append(item)
    return result


def run_healthcheck(test: list[str], ports: dict[str, int]) -> int:
    argv = localize(test[2:], ports, ROOT)
    return subprocess.run([sys.executable, "-m", "slotroute", *argv, "--timeout", "1"],
                          capture_output=True, env=subprocess_env(), cwd=ROOT, timeout=30).returncode


def wait_healthcheck(test, ports, process, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}: "
                                 f"{process.stderr.read()}")
        if run_healthcheck(test, ports) == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"healthcheck {test} did not pass within {deadline} s")


def test_compose_commands_run_and_turn_healthy(tmp_path):
    services = compose()["services"]
    ports = {"50051": free_port(), "50052": free_port()}
    processes = []
    try:
        for name in ("slotd", "dispatcher"):
            command = command_of(name)
            config = local_config(tmp_path, parse(command).config)
            argv = localize(command, ports, config)
            process = subprocess.Popen(
                [sys.executable, "-m", "slotroute", "--log-level", "warning", *argv],
                cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True,
            )
            processes.append(process)
            # Compose starts the dispatcher once slotd is healthy.
            wait_healthcheck(services[name]["healthcheck"]["test"], ports, process)

        resolved = subprocess.run(
            [sys.executable, "-m", "slotroute", "resolve", "hermes", "--quiet",
             "--dispatcher", f"127.0.0.1:{ports['50052']}"],
            capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=60)
    finally:
        # `docker compose down` sends SIGTERM.
        returncodes = []
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            returncodes.append(process.wait(timeout=20))

    assert resolved.returncode == 0, resolved.stderr
    assert resolved.stdout.startswith("http://127.0.0.1:")
    assert returncodes == [0, 0]


def test_dockerfile_cmd_runs_and_turns_healthy(tmp_path):
    command = json.loads(dockerfile_value("CMD"))
    healthcheck = dockerfile_value("HEALTHCHECK")
    test = ["CMD", *json.loads(healthcheck[healthcheck.index("CMD") + len("CMD"):])]
    ports = {"50051": free_port(), "50052": free_port()}
    # The image's config path, /app/examples/box.toml, is examples/box.toml here.
    config = local_config(tmp_path, parse(command).config.removeprefix(f"{IMAGE_WORKDIR}/"))
    process = subprocess.Popen(
        [sys.executable, "-m", "slotroute", "--log-level", "warning", *localize(command, ports, config)],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_healthcheck(test, ports, process)
    finally:
        # `docker stop` sends SIGTERM.
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=20)

    assert returncode == 0, process.stderr.read()
