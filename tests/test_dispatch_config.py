"""The dispatcher config loader and the model id rule: valid files load, invalid ones name the spot."""

from __future__ import annotations

import pathlib

import pytest
import tomli_w
from support import repo_root

from slotroute.configfile import ConfigError
from slotroute.dispatch.config import STANDARD_CAPABILITIES, load_dispatcher_config
from slotroute.ids import MAX_ID_LENGTH, InvalidModelId, check_model_id, model_key

SLOTD = {
    "listen": "127.0.0.1:50051",
    "heartbeat_interval": 1.0,
    "devices": [{"name": "gpu0", "memory": "8GiB"}],
    "slots": [
        {"name": "agent", "device": "gpu0", "capabilities": ["chat"], "default_model": "hermes",
         "command": ["run"]},
        {"name": "stt", "device": "gpu0", "capabilities": ["stt", "dictate"], "command": ["run"]},
        {"name": "remote", "device": "gpu0", "capabilities": ["chat"],
         "external_url": "http://127.0.0.1:9000"},
    ],
    "models": [
        {"id": "hermes", "path": "h.gguf", "capability": "chat", "slots": ["agent"]},
        {"id": "Qwen/Qwen3-4B:q4", "path": "q.gguf", "capability": "chat", "slots": ["agent"]},
    ],
}


def write(tmp_path: pathlib.Path, models: list[dict], *, slotd: dict | None = SLOTD,
          **dispatcher) -> pathlib.Path:
    document: dict = {"dispatcher": {"listen": "127.0.0.1:50052", **dispatcher, "models": models}}
    if slotd is not None:
        document["slotd"] = slotd
    path = tmp_path / "box.toml"
    path.write_text(tomli_w.dumps(document))
    return path


def config_error(path: pathlib.Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_dispatcher_config(path)
    return caught.value


# -- valid files ------------------------------------------------------------------------


def test_example_box_registry_loads():
    config = load_dispatcher_config(repo_root() / "examples" / "box.toml")

    assert [entry.id for entry in config.entries] == [
        "hermes-4-14b", "qwen3-4b", "qwen2.5-vl-7b", "bge-m3", "bge-reranker-v2-m3",
        "moonshine-small-streaming-en", "kokoro", "sdxl-turbo",
    ]
    assert config.entries[6].aliases == ("tts-1", "tts-1-hd")
    assert config.entries[6].capability == "tts"
    assert config.entries[0].slot == "agent"
    assert config.sources == ("127.0.0.1:50051",)
    assert config.staleness == 10.0


def test_overrides_replace_listen_and_sources(tmp_path):
    path = write(tmp_path, [])

    config = load_dispatcher_config(path, listen="127.0.0.1:0", sources=["127.0.0.1:7001", "[::1]:7002"])

    assert config.listen == "127.0.0.1:0"
    assert config.sources == ("127.0.0.1:7001", "[::1]:7002")


def test_sources_default_to_slotd_listen(tmp_path):
    config = load_dispatcher_config(write(tmp_path, []))

    assert config.sources == ("127.0.0.1:50051",)


def test_slotd_capabilities_join_known(tmp_path):
    config = load_dispatcher_config(write(tmp_path, [{"id": "w", "capability": "dictate"}]))

    assert config.capabilities == (*STANDARD_CAPABILITIES, "dictate")
    assert config.entries[0].capability == "dictate"


def test_unusual_ids_load(tmp_path):
    long_id = "x" * MAX_ID_LENGTH
    models = [{"id": "Qwen/Qwen3-4B:q4", "aliases": ["qwen:4b", "modèle-ünï", long_id], "slot": "agent"}]

    config = load_dispatcher_config(write(tmp_path, models))

    assert config.entries[0].aliases == ("qwen:4b", "modèle-ünï", long_id)


def test_external_slot_takes_any_id(tmp_path):
    config = load_dispatcher_config(write(tmp_path, [{"id": "gpt-4o", "slot": "remote"}]))

    assert config.entries[0].slot == "remote"


def test_capability_binding_with_labels(tmp_path):
    models = [{"id": "small-chat", "capability": "chat", "labels": {"size": "small"}}]

    config = load_dispatcher_config(write(tmp_path, models))

    assert config.entries[0].labels == {"size": "small"}


# -- invalid registry entries -------------------------------------------------------------


def test_duplicate_id_names_both_entries(tmp_path):
    path = write(tmp_path, [{"id": "hermes", "slot": "agent"}, {"id": " HERMES", "capability": "chat"}])

    error = config_error(path)

    assert error.path == str(path)
    assert error.entry == "[[dispatcher.models]] id = 'HERMES'"
    assert error.field == "id"
    assert "'HERMES' is already used by entry #1 ('hermes') as its id 'hermes'" in str(error)


def test_alias_equal_to_other_id(tmp_path):
    path = write(tmp_path, [{"id": "hermes", "slot": "agent"},
                            {"id": "helper", "aliases": ["Hermes"], "capability": "chat"}])

    error = config_error(path)

    assert error.entry == "[[dispatcher.models]] id = 'helper'"
    assert error.field == "aliases[0]"
    assert "'Hermes' is already used by entry #1 ('hermes') as its id 'hermes'" in str(error)


def test_alias_equal_to_other_alias(tmp_path):
    path = write(tmp_path, [{"id": "hermes", "aliases": ["big"], "slot": "agent"},
                            {"id": "helper", "aliases": ["small", "BIG"], "capability": "chat"}])

    error = config_error(path)

    assert error.entry == "[[dispatcher.models]] id = 'helper'"
    assert error.field == "aliases[1]"
    assert "as its aliases[0] 'big'" in str(error)


def test_alias_equal_to_own_id(tmp_path):
    error = config_error(write(tmp_path, [{"id": "hermes", "aliases": ["hermes "], "slot": "agent"}]))

    assert error.field == "aliases[0]"
    assert "is already used by this entry as its id 'hermes'" in str(error)


def test_unknown_slot_named(tmp_path):
    error = config_error(write(tmp_path, [{"id": "hermes", "slot": "agnet"}]))

    assert error.entry == "[[dispatcher.models]] id = 'hermes'"
    assert error.field == "slot"
    assert error.problem == "unknown slot 'agnet'; slots in [slotd]: agent, remote, stt"


def test_unknown_capability_named(tmp_path):
    error = config_error(write(tmp_path, [{"id": "voice", "capability": "speak"}]))

    assert error.field == "capability"
    assert error.problem.startswith("unknown capability 'speak'; known: chat, embed, rerank, stt, tts")
    assert "add others to [dispatcher] capabilities" in error.problem


def test_slot_cannot_load_bound_id(tmp_path):
    error = config_error(write(tmp_path, [{"id": "gpt-4o", "slot": "agent"}]))

    assert error.entry == "[[dispatcher.models]] id = 'gpt-4o'"
    assert error.field == "id"
    assert "slot 'agent' cannot load a model with id 'gpt-4o'" in error.problem


def test_slot_and_capability_both_set(tmp_path):
    error = config_error(write(tmp_path, [{"id": "hermes", "slot": "agent", "capability": "chat"}]))

    assert error.field == "slot"
    assert "set exactly one of 'slot'" in error.problem


def test_binding_missing(tmp_path):
    error = config_error(write(tmp_path, [{"id": "hermes"}]))

    assert error.field == "slot"
    assert "set exactly one of 'slot'" in error.problem


def test_labels_on_slot_binding(tmp_path):
    error = config_error(write(tmp_path, [{"id": "hermes", "slot": "agent", "labels": {"a": "b"}}]))

    assert error.field == "labels"
    assert error.problem == "labels apply to capability bindings only"


def test_unknown_source_named(tmp_path):
    path = write(tmp_path, [{"id": "hermes", "slot": "agent", "source": "127.0.0.1:9"}])

    error = config_error(path)

    assert error.field == "source"
    assert error.problem == "unknown source '127.0.0.1:9'; configured slotd: 127.0.0.1:50051"


def test_too_long_id_rejected(tmp_path):
    error = config_error(write(tmp_path, [{"id": "y" * (MAX_ID_LENGTH + 1), "capability": "chat"}]))

    assert error.field == "id"
    assert "model id of 256 characters is longer than the maximum of 255" in error.problem


def test_control_character_alias_rejected(tmp_path):
    error = config_error(write(tmp_path, [{"id": "hermes", "aliases": ["ok", "bad\tname"], "slot": "agent"}]))

    assert error.entry == "[[dispatcher.models]] id = 'hermes'"
    assert error.field == "aliases[1]"
    assert "control character U+0009 at position 3" in error.problem


def test_empty_id_rejected(tmp_path):
    error = config_error(write(tmp_path, [{"id": "  ", "capability": "chat"}]))

    assert error.field == "id"
    assert error.problem == "model id is empty; pass a model id such as 'kokoro'"


def test_misspelled_entry_field(tmp_path):
    error = config_error(write(tmp_path, [{"id": "hermes", "slot": "agent", "alias": ["h"]}]))

    assert error.entry == "[[dispatcher.models]] id = 'hermes'"
    assert error.field == "alias"
    assert error.problem.startswith("unknown field; known fields here:")


def test_watch_timeout_below_heartbeats(tmp_path):
    error = config_error(write(tmp_path, [], watch_timeout=1.5))

    assert error.entry == "dispatcher"
    assert error.field == "watch_timeout"
    assert "not more than twice [slotd] heartbeat_interval (1 s)" in error.problem


def test_missing_section_named(tmp_path):
    path = tmp_path / "box.toml"
    path.write_text(tomli_w.dumps({"slotd": SLOTD}))

    error = config_error(path)

    assert error.entry == "[dispatcher]"
    assert "section missing" in error.problem


# -- the id rule ------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", [
    "Qwen/Qwen3-8B", "llama3.2:1b", "whisper.en", "../../etc/passwd", "modèle-ünï", "模型",
    "z" * MAX_ID_LENGTH,
])
def test_valid_ids_kept_as_written(model_id):
    assert check_model_id(f"  {model_id}\n") == model_id


@pytest.mark.parametrize(("model_id", "problem"), [
    ("", "model id is empty"),
    (" \t ", "model id is empty"),
    ("z" * (MAX_ID_LENGTH + 1), "longer than the maximum of 255"),
    ("a\x00b", "control character U+0000"),
    ("a\nb", "control character U+000A"),
    ("a\x7fb", "control character U+007F"),
    ("a\u200bb", "U+200B"),
])
def test_invalid_ids_rejected(model_id, problem):
    with pytest.raises(InvalidModelId) as caught:
        check_model_id(model_id)

    assert problem in str(caught.value)


def test_key_ignores_case_space_and_form():
    assert model_key("  Hermes-4 ") == model_key("hermes-4")
    assert model_key("STRASSE") == model_key("straße")
    assert model_key("caf\u00e9") == model_key("cafe\u0301")
    assert model_key("a/b") != model_key("a:b")
