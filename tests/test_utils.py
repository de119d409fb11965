"""utils: safe JSON of any value (bytes, cycles, huge, odd objects), secret-key redaction and secret scrubbing."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import pytest
from pydantic import BaseModel, SecretStr

from otel_cmbagent.pipeline import values as utils
from otel_cmbagent.pipeline.values import (
    REDACTED,
    jsonable,
    register_secret,
    register_secrets_from_config,
    register_secrets_from_environment,
    scrub,
    to_json,
)

FAKE_KEY = "sk-test-FAKEKEY-0123456789abcdefXYZ"
MARK = "truncated by otel-cmbagent"
LIMIT = 1_000


@pytest.fixture(autouse=True)
def _isolated_secrets(monkeypatch):
    """Each test starts with no registered secrets and cannot leak its own into other tests."""
    monkeypatch.setattr(utils, "_known_secrets", set())
    monkeypatch.setattr(utils, "_known_secrets_sorted", ())


def _strict_json(text: str):
    """Parse as standard JSON (NaN/Infinity are not JSON)."""

    def reject(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


# --- jsonable / to_json --------------------------------------------------------------------------


def test_bytes_become_a_size_marker():
    """bytes, bytearray and memoryview are recorded as `<binary N bytes>`, never their content."""
    assert jsonable(b"\x00\x01\x02", LIMIT) == "<binary 3 bytes>"
    assert jsonable(bytearray(10), LIMIT) == "<binary 10 bytes>"
    assert jsonable(memoryview(b"abcd"), LIMIT) == "<binary 4 bytes>"
    assert to_json({"blob": b"secret-bytes"}, LIMIT) == '{"blob":"<binary 12 bytes>"}'


def test_cycles_become_a_marker_but_shared_values_do_not():
    """A self-referencing dict/list is cut with `<cycle>`; the same list referenced twice is kept twice."""
    node: dict = {"name": "n"}
    node["self"] = node
    assert jsonable(node, LIMIT) == {"name": "n", "self": "<cycle>"}
    loop: list = [1]
    loop.append(loop)
    assert jsonable(loop, LIMIT) == [1, "<cycle>"]
    shared = [1, 2]
    assert jsonable({"a": shared, "b": shared}, LIMIT) == {"a": [1, 2], "b": [1, 2]}
    assert _strict_json(to_json(node, LIMIT)) == {"name": "n", "self": "<cycle>"}


def test_huge_string_is_cut_at_the_limit_with_a_marker():
    """A string longer than the limit keeps exactly `limit` chars, then the marker with the original length."""
    value = jsonable("a" * 50_000, 100)
    assert value.startswith("a" * 100)
    assert value[100] != "a"
    assert MARK in value[100:]
    assert "50000" in value[100:]
    assert jsonable("b" * 100, 100) == "b" * 100  # exactly at the limit: untouched


def test_to_json_output_is_bounded():
    """to_json of a huge string or a large structure stays within the limit plus the marker."""
    for value in ("c" * 1_000_000, {f"k{i}": "v" * 50 for i in range(10_000)}):
        text = to_json(value, 200)
        assert MARK in text
        assert len(text) <= 200 + len(utils.TRUNCATION_MARK) + 20


def test_non_json_objects_become_their_repr():
    """Objects JSON cannot encode are recorded as their repr."""

    class Thing:
        def __repr__(self) -> str:
            return "Thing<42>"

    assert jsonable(Thing(), LIMIT) == "Thing<42>"
    assert _strict_json(to_json({"thing": Thing(), "n": 1}, LIMIT)) == {"thing": "Thing<42>", "n": 1}


def test_nan_becomes_a_string():
    """NaN (not valid JSON) is recorded as the string "NaN"; the output is strict JSON."""
    assert jsonable(math.nan, LIMIT) == "NaN"
    assert _strict_json(to_json([1.5, math.nan], LIMIT)) == [1.5, "NaN"]


def test_infinity_is_valid_json():
    """+/-inf, like NaN, produce strict JSON from to_json."""
    _strict_json(to_json({"hi": math.inf, "lo": -math.inf}, LIMIT))


def test_sets_and_tuples_become_lists():
    """Sets, frozensets and tuples become JSON arrays with the same items."""
    assert sorted(jsonable({3, 1, 2}, LIMIT)) == [1, 2, 3]
    assert sorted(jsonable(frozenset({"x", "y"}), LIMIT)) == ["x", "y"]
    assert jsonable((1, "two"), LIMIT) == [1, "two"]
    assert sorted(_strict_json(to_json({"s": {4, 5}}, LIMIT))["s"]) == [4, 5]


def test_pydantic_models_and_dataclasses_become_dicts():
    """Pydantic models and dataclasses become dicts; a SecretStr value is redacted whatever its key."""

    class Inner(BaseModel):
        depth: int

    class Model(BaseModel):
        name: str
        opaque: SecretStr
        inner: Inner

    @dataclasses.dataclass
    class Point:
        x: int
        label: str

    model = Model(name="m", opaque=SecretStr("hidden-value-123"), inner=Inner(depth=2))
    assert jsonable(model, LIMIT) == {"name": "m", "opaque": REDACTED, "inner": {"depth": 2}}
    assert jsonable(Point(1, "p"), LIMIT) == {"x": 1, "label": "p"}
    assert "hidden-value-123" not in to_json(model, LIMIT)


def test_object_whose_repr_raises_becomes_its_type_name():
    """An object whose __repr__ raises is recorded as `<TypeName>`."""

    class Angry:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    assert jsonable(Angry(), LIMIT) == "<Angry>"
    assert _strict_json(to_json([Angry()], LIMIT)) == ["<Angry>"]


class _RaisingRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr")


class _RaisingModelDump(_RaisingRepr):
    def model_dump(self):
        raise RuntimeError("model_dump")


class _RaisingGetattr:
    def __getattr__(self, name):
        raise RuntimeError(f"no attribute access: {name}")


class _BadKey:
    def __str__(self) -> str:
        raise RuntimeError("str")

    def __hash__(self) -> int:
        return 1


class _BrokenMapping(Mapping):
    def __getitem__(self, key):
        raise RuntimeError("getitem")

    def __iter__(self):
        raise RuntimeError("iter")

    def __len__(self) -> int:
        return 1


def _deep(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        _RaisingRepr(),
        _RaisingModelDump(),
        _RaisingGetattr(),
        {_BadKey(): 1},
        _BrokenMapping(),
        _deep(5_000),
        {"nested": [{"bytes": b"x", "nan": math.nan, "set": {1}}]},
    ],
    ids=["repr-raises", "model_dump-raises", "getattr-raises", "key-str-raises", "broken-mapping", "5000-deep", "mix"],
)
def test_to_json_never_raises(value):
    """to_json returns parseable JSON text for values that break repr, attribute access, iteration or depth."""
    text = to_json(value, LIMIT)
    assert isinstance(text, str)
    _strict_json(text)


# --- secret-named keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["api_key", "Authorization", "x-api-key", "github_token", "password", "OPENAI_API_KEY", "client_secret"]
)
def test_secret_named_keys_are_redacted(key):
    """A value under a secret-looking key is replaced by [REDACTED], at any nesting level."""
    value = {"model": "gpt-4o", key: "opaque-value-123", "config_list": [{key: "nested-value-456"}]}
    assert jsonable(value, LIMIT) == {"model": "gpt-4o", key: REDACTED, "config_list": [{key: REDACTED}]}
    text = to_json(value, LIMIT)
    assert "opaque-value-123" not in text
    assert "nested-value-456" not in text


@pytest.mark.parametrize("key", ["max_tokens", "completion_tokens", "prompt_tokens", "token_count", "author"])
def test_token_counts_and_similar_keys_are_kept(key):
    """Keys that merely mention tokens (counts) or start like 'auth' are not secrets."""
    assert jsonable({key: 512}, LIMIT) == {key: 512}


def test_empty_secret_values_are_kept_as_empty():
    """An api_key of None or "" is recorded as such (shows it is unset), not as [REDACTED]."""
    assert jsonable({"api_key": None, "password": ""}, LIMIT) == {"api_key": None, "password": ""}


# --- scrubbing -----------------------------------------------------------------------------------


def test_registered_secret_is_scrubbed_everywhere():
    """A registered secret is removed from scrub() text and from to_json output under any key."""
    register_secret("opaque-secret-value-42")
    assert scrub("use opaque-secret-value-42 now") == f"use {REDACTED} now"
    assert "opaque-secret-value-42" not in to_json({"message": "key=opaque-secret-value-42"}, LIMIT)


def test_short_or_non_string_secrets_are_not_registered():
    """Values shorter than 8 chars (or not strings) are ignored, so common words are never scrubbed."""
    register_secret("abc")
    register_secret(12345678)
    register_secret(None)
    assert scrub("abc 12345678") == "abc 12345678"


def test_longer_secret_is_scrubbed_whole():
    """When one secret contains another, the longer one is replaced whole (no leftover fragment)."""
    register_secret("abcdefgh")
    register_secret("abcdefgh-12345678")
    assert scrub("x abcdefgh-12345678 y abcdefgh") == f"x {REDACTED} y {REDACTED}"


@pytest.mark.parametrize(
    "credential",
    [FAKE_KEY, "sk-proj-abcdefghijklmnop", "Bearer abcdefgh12345678", "AKIAIOSFODNN7EXAMPLE"],
)
def test_credential_looking_values_are_scrubbed(credential):
    """API keys (sk-...), bearer tokens and AWS key ids are scrubbed without being registered."""
    text = scrub(f"header: {credential} end")
    assert credential not in text
    assert REDACTED in text
    assert text.startswith("header: ") and text.endswith(" end")


@pytest.mark.parametrize("text", ["ask-me-anything", "sk-short", "Bearer", "AKIA123", "tokens used: 512"])
def test_ordinary_text_is_not_scrubbed(text):
    """Text that only resembles a credential prefix is left alone."""
    assert scrub(text) == text


def test_register_secrets_from_config_finds_nested_api_keys():
    """api_key values inside config_list dicts (and SecretStr values) are registered; other values are not."""
    config = {
        "config_list": [
            {"model": "gpt-4o-mini-2024", "api_key": "nested-secret-aaaa1111"},
            {"model": "claude-model-x", "api_key": SecretStr("nested-secret-bbbb2222")},
        ],
        "temperature": 0,
    }
    register_secrets_from_config(config)
    text = scrub("nested-secret-aaaa1111 nested-secret-bbbb2222 gpt-4o-mini-2024 claude-model-x")
    assert text == f"{REDACTED} {REDACTED} gpt-4o-mini-2024 claude-model-x"


def test_register_secrets_from_environment_uses_the_given_mapping():
    """Only *_API_KEY/*_TOKEN/... values of the given mapping are registered, if long enough."""
    register_secrets_from_environment(
        {
            "MY_SERVICE_API_KEY": "env-secret-value-123",
            "GITHUB_TOKEN": "env-token-value-456",
            "HOME": "/home/not-a-secret-user",
            "SHORT_TOKEN": "abc",
        }
    )
    text = scrub("env-secret-value-123 env-token-value-456 /home/not-a-secret-user abc")
    assert text == f"{REDACTED} {REDACTED} /home/not-a-secret-user abc"


def test_secret_variable_set_later_is_noticed(monkeypatch):
    """A *_API_KEY variable set after the first scrub (e.g. loaded after setup) is scrubbed from the next value."""
    assert scrub("first look") == "first look"
    monkeypatch.setenv("LATE_SERVICE_API_KEY", "late-env-secret-31337")
    monkeypatch.setenv("LATE_NOTE", "not-a-secret-value-1")
    assert scrub("late-env-secret-31337 not-a-secret-value-1") == f"{REDACTED} not-a-secret-value-1"
    monkeypatch.setenv("LATE_SERVICE_API_KEY", "changed-env-secret-4242")
    assert "changed-env-secret-4242" not in to_json({"m": "changed-env-secret-4242"}, LIMIT)


# --- issue 10: storable values, escaped secrets, secrets at the cut --------------------------------


@pytest.mark.parametrize("bad", ["\x00", "\udcff", "\ud800", "a\x00b\udfffc"])
def test_nul_and_lone_surrogates_become_the_replacement_character(bad):
    """Values every sink can store: NUL (PostgreSQL) and lone surrogates (UTF-8 encoders) become U+FFFD."""
    for text in (to_json({"arg": bad, bad: 1}, LIMIT), utils.safe_text(bad, LIMIT), utils.clean_text("x" + bad, LIMIT)):
        text.encode("utf-8")  # would raise on a lone surrogate
        assert "\x00" not in text and utils.REPLACEMENT in text
    assert utils.storable("plain ascii") == "plain ascii" and utils.storable("é 😀") == "é 😀"


@pytest.mark.parametrize("secret", ['pa"ss\\word-0042', 'quote"only-secret', "back\\slash-secret", "ünï\"cødé-1"])
def test_secret_with_quotes_or_backslashes_is_scrubbed_in_every_spelling(secret):
    """Scrubbing on values (not JSON text), plus the escaped spellings: no form of the secret survives."""
    register_secret(secret)
    escaped = json.dumps(secret)[1:-1]
    for text in (
        to_json({"message": f"pw {secret}"}, LIMIT),
        to_json([json.dumps({"pw": secret})], LIMIT),  # a tool result that is itself JSON
        utils.safe_text(f"raise ValueError({secret!r})", LIMIT),
        scrub(f"{secret} / {escaped} / {secret!r}"),
    ):
        assert secret not in text and escaped not in text and repr(secret)[1:-1] not in text, text


def test_secret_straddling_the_cut_is_scrubbed_before_cutting():
    """A 20-char secret starting 3 chars before the limit: not a single character of it is kept."""
    secret = "straddle-SECRET-9876"
    register_secret(secret)
    limit = 100
    value = "x" * (limit - 3) + secret + "y" * 50
    for text in (jsonable(value, limit), utils.safe_text(value, limit), json.loads(to_json({"m": value}, 10_000))["m"]):
        kept = text.split("…[truncated")[0] if MARK in text else text
        assert "str" not in kept.replace(REDACTED, "").replace("x", "").replace("y", ""), text
    cut = jsonable(value, limit)
    assert cut.startswith("x" * (limit - 3) + "[RE") and f"{len(value)} chars in total" in cut  # was "...xxxstr"
