"""slotd config loading: a valid file, and one precise message per kind of mistake."""

import pytest
from support import _PORT_BASE, TEST_PORTS, model, slot, write_config

from slotroute.configfile import ConfigError
from slotroute.slot.config import load_slotd_config


def load_error(tmp_path, **kwargs) -> str:
    path = write_config(tmp_path, **kwargs)
    with pytest.raises(ConfigError) as raised:
        load_slotd_config(path)
    return str(raised.value)


def test_valid_config_loads(tmp_path):
    path = write_config(tmp_path, slots=[slot("a", model="m1")], models=[model("m1", ["a"])])
    config = load_slotd_config(path)
    assert [spec.name for spec in config.slots] == ["a"]
    assert config.models[0].id == "m1"
    assert config.cache_dir == (tmp_path / "models").resolve()
    assert config.port_range == (_PORT_BASE, _PORT_BASE + 499)


def test_duplicate_slot_name(tmp_path):
    message = load_error(tmp_path, slots=[slot("a"), slot("a")])
    assert message == (
        f"{tmp_path / 'box.toml'}: [[slotd.slots]] name = 'a': field 'name': "
        "duplicate name 'a'; each entry needs its own name"
    )


def test_unknown_device(tmp_path):
    message = load_error(tmp_path, slots=[slot("a", device="gpu9")])
    assert message == (
        f"{tmp_path / 'box.toml'}: [[slotd.slots]] name = 'a': field 'device': "
        "unknown device 'gpu9'; known devices: dev0"
    )


def test_model_path_outside_cache(tmp_path):
    message = load_error(
        tmp_path, slots=[slot("a")], models=[model("m1", ["a"], path="../../etc/passwd")],
        create_files=False,
    )
    assert message.startswith(f"{tmp_path / 'box.toml'}: [[slotd.models]] id = 'm1': field 'path': "
                              "model path '../../etc/passwd' leaves the cache directory")


def test_absolute_model_path(tmp_path):
    message = load_error(
        tmp_path, slots=[slot("a")], models=[model("m1", ["a"], path="/etc/passwd")],
        create_files=False,
    )
    assert "field 'path': model path '/etc/passwd' leaves the cache directory" in message


def test_symlink_out_of_cache(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "link.bin").symlink_to("/etc/hostname")
    message = load_error(
        tmp_path, slots=[slot("a")], models=[model("m1", ["a"], path="link.bin")], create_files=False,
    )
    assert "field 'path': model path 'link.bin' resolves to /etc/hostname, outside the cache" in message


def test_unknown_placeholder(tmp_path):
    entry = slot("a")
    entry["command"] = ["{python}", "-m", "x", "--port", "{prot}"]
    message = load_error(tmp_path, slots=[entry])
    assert message.startswith(
        f"{tmp_path / 'box.toml'}: [[slotd.slots]] name = 'a': field 'command[4]': "
        "unknown placeholder {prot} in '{prot}'; known: "
    )


def test_port_range_contains_service_port(tmp_path):
    service_port = _PORT_BASE + 250
    message = load_error(tmp_path, slots=[slot("a")], slotd={"listen": f"127.0.0.1:{service_port}"})
    assert message == (
        f"{tmp_path / 'box.toml'}: slotd: field 'ports': port range {TEST_PORTS} contains the "
        f"service port {service_port}; move the range or the service's listen address"
    )


def test_port_range_contains_dispatcher_port(tmp_path):
    message = load_error(tmp_path, slots=[slot("a")],
                         dispatcher={"listen": f"127.0.0.1:{_PORT_BASE + 1}"})
    assert f"field 'ports': port range {TEST_PORTS} contains the service port {_PORT_BASE + 1}" in message


def test_misspelled_field(tmp_path):
    message = load_error(tmp_path, slots=[slot("a", capabilites=["chat"])])
    assert message.startswith(
        f"{tmp_path / 'box.toml'}: [[slotd.slots]] name = 'a': field 'capabilites': unknown field"
    )


def test_duplicate_model_ids_ignore_case(tmp_path):
    message = load_error(
        tmp_path, slots=[slot("a")], models=[model("Qwen", ["a"]), model("qwen ", ["a"], path="x.bin")],
    )
    assert "field 'id': duplicate model id 'qwen' (matches 'Qwen'" in message


def test_default_model_not_in_catalog(tmp_path):
    message = load_error(tmp_path, slots=[slot("a", model="ghost")])
    assert message == (
        f"{tmp_path / 'box.toml'}: [[slotd.slots]] name = 'a': field 'default_model': "
        "unknown model 'ghost'; catalog models: none declared"
    )


def test_invalid_toml_names_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[slotd\n")
    with pytest.raises(ConfigError) as raised:
        load_slotd_config(path)
    assert str(raised.value).startswith(f"{path}: file: invalid TOML: ")


def test_example_box_is_valid():
    from support import repo_root

    config = load_slotd_config(repo_root() / "examples" / "box.toml")
    assert [spec.name for spec in config.slots] == [
        "agent", "utility", "embed", "rerank", "stt", "tts", "img", "vision"
    ]


def test_negative_model_memory(tmp_path):
    message = load_error(tmp_path, slots=[slot("a")], models=[model("m1", ["a"], memory=-20_000_000_000)])
    assert message == (
        f"{tmp_path / 'box.toml'}: [[slotd.models]] id = 'm1': field 'memory': invalid size "
        "-20000000000; use a size from 0 to 1 EiB such as '8GiB'"
    )


def test_oversized_device_memory(tmp_path):
    message = load_error(tmp_path, slots=[slot("a")], devices=[{"name": "dev0", "memory": "99999999999TiB"}])
    assert message == (
        f"{tmp_path / 'box.toml'}: [[slotd.devices]] name = 'dev0': field 'memory': invalid size "
        "'99999999999TiB'; use a size from 0 to 1 EiB such as '8GiB', or 'auto'"
    )


def test_infinite_timeout(tmp_path):
    message = load_error(tmp_path, slots=[slot("a", start_timeout=float("inf"))])
    assert message == (
        f"{tmp_path / 'box.toml'}: [[slotd.slots]] name = 'a': field 'start_timeout': "
        "invalid value inf; use a finite number of seconds"
    )


def test_misspelled_section(tmp_path):
    path = write_config(tmp_path, slots=[slot("a")])
    path.write_text(path.read_text() + "\n[dispatchr]\nlisten = '127.0.0.1:1'\n")
    with pytest.raises(ConfigError) as raised:
        load_slotd_config(path)
    assert str(raised.value) == (
        f"{path}: [dispatchr]: unknown section; the known sections are [slotd] and [dispatcher]"
    )


def test_binary_file_is_config_error(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ConfigError) as raised:
        load_slotd_config(path)
    assert str(raised.value).startswith(f"{path}: file: not UTF-8 text (")
    assert str(raised.value).endswith("; save the config as UTF-8 TOML")


def test_directory_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_slotd_config(tmp_path)
    assert str(raised.value) == f"{tmp_path}: file: is a directory; pass a TOML file"


def test_model_capability_not_offered(tmp_path):
    message = load_error(tmp_path, slots=[slot("a")], models=[model("m1", ["a"], capability="tts")])
    assert message == (
        f"{tmp_path / 'box.toml'}: [[slotd.models]] id = 'm1': field 'capability': capability 'tts' "
        "is not offered by slot 'a' (chat); add it to the slot or remove the slot"
    )


def test_model_larger_than_device(tmp_path):
    message = load_error(tmp_path, slots=[slot("a")], models=[model("m1", ["a"], memory="80GiB")],
                         devices=[{"name": "dev0", "memory": "24GiB"}])
    assert message == (
        f"{tmp_path / 'box.toml'}: [[slotd.models]] id = 'm1': field 'memory': model needs "
        "80.0 GiB but the largest device of its slots has 24.0 GiB; it could never load"
    )


def test_dispatcher_on_slotd_port(tmp_path):
    port = _PORT_BASE - 7
    message = load_error(tmp_path, slots=[slot("a")], slotd={"listen": f"127.0.0.1:{port}"},
                         dispatcher={"listen": f"127.0.0.1:{port}"})
    assert message == (
        f"{tmp_path / 'box.toml'}: slotd: field 'listen': port {port} is also [dispatcher] listen; "
        "give the two services different ports"
    )


def test_port_range_contains_metrics_port(tmp_path):
    metrics = _PORT_BASE + 3
    message = load_error(tmp_path, slots=[slot("a")], slotd={"metrics_listen": f"127.0.0.1:{metrics}"})
    assert f"field 'ports': port range {TEST_PORTS} contains the service port {metrics}" in message
