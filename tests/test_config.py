"""InstrumentationConfig.resolve: explicit argument > environment variable > default, and validation."""

from __future__ import annotations

import logging

import pytest

from otel_cmbagent import InstrumentationConfig
from otel_cmbagent.pipeline.config import CAPTURE_CONTENT_ENV, DEFAULT_MAX_VALUE_LENGTH, MAX_VALUE_LENGTH_ENV


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """No ambient configuration leaks into a test."""
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    monkeypatch.delenv(MAX_VALUE_LENGTH_ENV, raising=False)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_env_var_names_are_the_documented_ones():
    """The variables read are OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT and OTEL_CMBAGENT_MAX_VALUE_LENGTH."""
    assert CAPTURE_CONTENT_ENV == "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
    assert MAX_VALUE_LENGTH_ENV == "OTEL_CMBAGENT_MAX_VALUE_LENGTH"


def test_defaults_capture_content_and_16k_values():
    """With nothing set, content is captured and values are cut at 16 KiB."""
    config = InstrumentationConfig.resolve()
    assert config.capture_content is True
    assert config.max_value_length == DEFAULT_MAX_VALUE_LENGTH == 16 * 1024


@pytest.mark.parametrize("raw", ["false", "0", "NO_CONTENT", "False", " off ", "no"])
def test_env_can_turn_content_off(monkeypatch, raw):
    """false/0/NO_CONTENT (any case, surrounding spaces ignored) in the env disable content capture."""
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, raw)
    assert InstrumentationConfig.resolve().capture_content is False


@pytest.mark.parametrize("raw", ["true", "1", "SPAN_AND_EVENT", "", "   "])
def test_env_true_or_blank_keeps_content_on(monkeypatch, raw):
    """true/1/SPAN_AND_EVENT, or a blank value, leave content capture on."""
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, raw)
    assert InstrumentationConfig.resolve().capture_content is True


@pytest.mark.parametrize(("env", "explicit"), [("false", True), ("true", False), ("garbage", False)])
def test_explicit_argument_beats_env(monkeypatch, caplog, env, explicit):
    """An explicit capture_content wins over the env variable (which is then not even parsed)."""
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, env)
    assert InstrumentationConfig.resolve(capture_content=explicit).capture_content is explicit
    assert _warnings(caplog) == []


def test_bad_env_value_falls_back_to_default_with_a_warning(monkeypatch, caplog):
    """An unrecognised env value is ignored (default True) and a warning names the variable and value."""
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "maybe")
    caplog.set_level(logging.WARNING)
    assert InstrumentationConfig.resolve().capture_content is True
    (message,) = _warnings(caplog)
    assert CAPTURE_CONTENT_ENV in message
    assert "maybe" in message


@pytest.mark.parametrize("bad", ["yes", 1, 0, "false"])
def test_bad_explicit_capture_content_raises_type_error(bad):
    """capture_content must be a real bool or None: strings and ints raise TypeError naming the option."""
    with pytest.raises(TypeError, match="capture_content"):
        InstrumentationConfig.resolve(capture_content=bad)


@pytest.mark.parametrize("bad", [0, -1, "10", True, 1.5])
def test_bad_explicit_max_value_length_raises(bad):
    """max_value_length must be a positive int: 0, negatives, strings, bools and floats are rejected clearly."""
    with pytest.raises((TypeError, ValueError), match="max_value_length must be a positive integer"):
        InstrumentationConfig.resolve(max_value_length=bad)


def test_bad_explicit_track_files_raises_type_error():
    """track_files must be a bool or None."""
    with pytest.raises(TypeError, match="track_files"):
        InstrumentationConfig.resolve(track_files="no")


def test_max_value_length_from_env(monkeypatch):
    """OTEL_CMBAGENT_MAX_VALUE_LENGTH sets the limit; an explicit argument beats it."""
    monkeypatch.setenv(MAX_VALUE_LENGTH_ENV, "2048")
    assert InstrumentationConfig.resolve().max_value_length == 2048
    assert InstrumentationConfig.resolve(max_value_length=100).max_value_length == 100


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "1.5"])
def test_bad_max_value_length_env_falls_back_with_a_warning(monkeypatch, caplog, raw):
    """A non-positive or non-integer OTEL_CMBAGENT_MAX_VALUE_LENGTH is ignored with a warning."""
    monkeypatch.setenv(MAX_VALUE_LENGTH_ENV, raw)
    caplog.set_level(logging.WARNING)
    assert InstrumentationConfig.resolve().max_value_length == DEFAULT_MAX_VALUE_LENGTH
    (message,) = _warnings(caplog)
    assert MAX_VALUE_LENGTH_ENV in message
    assert repr(raw) in message


def test_resolve_reads_env_at_call_time(monkeypatch):
    """The environment is read when resolve() is called, not when the module is imported."""
    assert InstrumentationConfig.resolve().capture_content is True
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "false")
    monkeypatch.setenv(MAX_VALUE_LENGTH_ENV, "64")
    config = InstrumentationConfig.resolve()
    assert (config.capture_content, config.max_value_length) == (False, 64)
