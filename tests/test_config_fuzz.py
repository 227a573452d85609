"""Fuzzing config files and ``--key value`` overrides all the way into the real configs (TrainConfig, LMConfig,
MoEConfig): any input either gives a config whose every field has its declared type, or a ConfigError (a
MoekitError); never another exception."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from moekit.config import Config, parse_overrides, read_config_file
from moekit.errors import ConfigError
from moekit.models.config import LMConfig
from moekit.models.presets import get_preset, resolve_lm_config
from moekit.nn.config import MoEConfig
from moekit.train.config import TrainConfig
from tests.fuzzing import fuzz, loaded_or_refused, outcome

# -- the property: a config whose fields have their declared types ---------------------------------------------


def _fits(hint: Any, value: Any) -> bool:
    """Whether ``value`` has the type ``hint`` declares, elements of tuples, lists and dicts included."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(arm, value) for arm in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a number too (PEP 484's numeric tower)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return isinstance(value, tuple) and all(_fits(args[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(args[0], k) and _fits(args[1], v) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_fits(args[0], v) for v in value)
    assert isinstance(hint, type), f"the test cannot judge the hint {hint!r}"
    return isinstance(value, hint)


def _assert_typed(config: Config) -> None:
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        assert _fits(hints[field.name], value), f"{type(config).__name__}.{field.name}={value!r}"
        if isinstance(value, Config):
            _assert_typed(value)


def _built_or_refused(build: typing.Callable[[], Config]) -> Config | None:
    config = loaded_or_refused(build, "built")
    if config is not None:
        _assert_typed(config)
    return config


# -- values a config file or an option can hold ----------------------------------------------------------------

_NUMBERS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([2**31, 2**63, 10**30, 10**400, -(10**400)]),
    st.floats(),  # nan and inf included
)
_LEAVES = st.one_of(st.none(), st.booleans(), _NUMBERS, st.text(max_size=10))
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
_TRAIN_KEYS = sorted(TrainConfig.field_names())
_LM_KEYS = sorted(LMConfig.field_names())
_MOE_KEYS = sorted(MoEConfig.field_names())
_OPTION_KEYS = st.one_of(
    st.sampled_from(_TRAIN_KEYS),
    st.sampled_from(_TRAIN_KEYS).map(lambda k: k.replace("_", "-")),
    st.sampled_from(_LM_KEYS).map(lambda k: f"model.{k}"),
    st.sampled_from(_MOE_KEYS).map(lambda k: f"model.moe.{k}"),
    st.text(max_size=12),
)


# -- --key value overrides -------------------------------------------------------------------------------------

_TOKENS = st.lists(
    st.one_of(
        st.text(max_size=8),
        st.text(max_size=8).map(lambda t: "--" + t),
        st.tuples(_OPTION_KEYS, st.text(max_size=8)).map(lambda kv: f"--{kv[0]}={kv[1]}"),
        st.sampled_from(["--", "-", "true", "null", "1e-3", "0x1F", "1_000", ".5", "~", "[1, 2]", "{a: 1}", "'x"]),
    ),
    max_size=6,
)


@fuzz(300)
@given(tokens=_TOKENS)
def test_any_command_line_parses_to_scalars_or_is_refused(tokens):
    try:
        options = parse_overrides(tokens)
    except ConfigError:
        outcome("refused: ConfigError")
        return
    outcome("parsed")
    assert all(isinstance(k, str) and "-" not in k for k in options)
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in options.values())


@st.composite
def _command_lines(draw) -> list[str]:
    """Mostly well-formed ``--key value`` pairs, with keys of the real configs and values of any spelling."""
    tokens = []
    for key in draw(st.lists(_OPTION_KEYS, max_size=5)):
        value = draw(st.one_of(_LEAVES.map(lambda v: json.dumps(v) if not isinstance(v, str) else v), _TOKENS_VALUE))
        tokens += [f"--{key}={value}"] if draw(st.booleans()) else [f"--{key}", value]
    return tokens


_TOKENS_VALUE = st.sampled_from(["1e-3", "2m", "90s", "1.5h", "true", "no", "null", "~", "8", "-1", "0", "adamw"])


@fuzz(300)
@given(tokens=_command_lines(), vocab=st.sampled_from([1, 256, 10**6]), block=st.sampled_from([1, 64, 10**6]))
def test_command_lines_give_typed_train_and_model_configs_or_a_config_error(tokens, vocab, block):
    def build() -> Config:
        options = parse_overrides(tokens)
        train = TrainConfig.from_options(options)
        _assert_typed(train)
        _assume_buildable(train.model_overrides)
        return resolve_lm_config(train.model, train.model_overrides, vocab, block)

    _built_or_refused(build)


def _assume_buildable(model_overrides: dict) -> None:
    # LMConfig lists its sparse layers one by one, so a billion layers takes minutes: not what fuzzing is for.
    layers = model_overrides.get("num_hidden_layers")
    assume(not isinstance(layers, int) or layers <= 2**16)


# -- config files ----------------------------------------------------------------------------------------------

_SUFFIXES = [".json", ".toml", ".yaml", ".yml", ".cfg"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("config_fuzz")


@fuzz(200)
@given(raw=st.binary(max_size=200), suffix=st.sampled_from(_SUFFIXES))
def test_random_bytes_as_a_config_file_are_a_mapping_or_refused(folder, raw, suffix):
    path = folder / f"random{suffix}"
    path.write_bytes(raw)
    try:
        data = read_config_file(path)
    except ConfigError:
        outcome("refused: ConfigError")
        return
    outcome("read")
    assert isinstance(data, dict) and all(isinstance(k, str) for k in data)


_YAML_SNIPPETS = st.sampled_from(
    [
        "lr: 1e-3\n",
        "1: 2\n",
        "~: x\n",
        "? [a, b]\n: 1\n",
        "a: &x [*x]\n",
        "max_steps: 2020-01-01\n",
        "model_overrides: {moe: {top_k: 3}}\n",
        "data: [a, 1]\n",
        "time_budget: " + "9" * 400 + "\n",
        "time_budget: " + "9" * 5000 + "\n",
        "lr: !!python/object:os.system x\n",
        "- 1\n- 2\n",
        "max_steps: 0x10\n",
        "%YAML 1.1\n---\nlr: .inf\n",
    ]
)


@fuzz(200)
@given(
    data=st.dictionaries(_OPTION_KEYS, _VALUES, max_size=5),
    snippet=st.one_of(st.just(""), _YAML_SNIPPETS),
    suffix=st.sampled_from([".json", ".yaml"]),
)
def test_config_files_give_typed_train_configs_or_a_config_error(folder, data, snippet, suffix):
    path = folder / f"config{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        path.write_text(yaml.safe_dump(data) + snippet if data else snippet)

    def build() -> Config:
        options = read_config_file(path)
        train = TrainConfig.from_options(options)
        _assume_buildable(train.model_overrides)
        return train

    _built_or_refused(build)


# -- the model configs, from a valid one with random fields changed ------------------------------------------


@st.composite
def _mutated(draw, base: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    data = dict(base)
    for key in draw(st.lists(st.one_of(st.sampled_from(keys), st.text(max_size=8)), min_size=1, max_size=3)):
        if draw(st.integers(0, 9)) == 0:
            data.pop(key, None)
        else:
            data[key] = draw(_VALUES)
    return data


_DEMO = get_preset("demo").to_dict()


@fuzz(300)
@given(data=_mutated(_DEMO["moe"], _MOE_KEYS))
def test_moe_configs_are_typed_or_refused(data):
    _built_or_refused(lambda: MoEConfig.from_dict(data))


@fuzz(300)
@given(
    data=_mutated(_DEMO, _LM_KEYS),
    moe=st.one_of(st.none(), _mutated(_DEMO["moe"], _MOE_KEYS)),
    overrides=st.one_of(
        st.none(), st.dictionaries(st.one_of(st.integers(-1, 4), st.text(max_size=3)), _VALUES, max_size=3)
    ),
)
def test_lm_configs_are_typed_or_refused(data, moe, overrides):
    if moe is not None:
        data["moe"] = moe
    if overrides is not None:
        data["moe_layer_overrides"] = overrides
    _assume_buildable(data)
    _built_or_refused(lambda: LMConfig.from_dict(data))


@fuzz(100)
@given(data=st.dictionaries(st.one_of(st.sampled_from(_LM_KEYS), st.text(max_size=6)), _VALUES, max_size=6))
def test_model_configs_from_scratch_are_typed_or_refused(data):
    _assume_buildable(data)
    _built_or_refused(lambda: LMConfig.from_dict(data))


def test_the_typed_check_judges_every_field_of_the_real_configs():
    for config in (TrainConfig(), LMConfig.from_dict(_DEMO), MoEConfig.from_dict(_DEMO["moe"])):
        _assert_typed(config)  # the checker itself must accept valid configs and know every hint they use
    assert not _fits(tuple[str, ...], ("a", 1)) and not _fits(float | None, "1") and _fits(float, 1)


@pytest.mark.parametrize(
    "options", [{"model_overrides": True, "model.top_k": 1}, {"model.moe": 5, "model.moe.top_k": 2}]
)
def test_a_model_key_after_a_non_mapping_model_override_is_a_config_error(options):
    # Fuzzing found TrainConfig.from_options failing here with a TypeError or ValueError.
    with pytest.raises(ConfigError, match="model_overrides|moe"):
        TrainConfig.from_options(options)


# -- regressions the fuzzing found ----------------------------------------------------------------------------


def test_a_config_file_that_is_not_utf8_is_a_config_error(folder):
    path = folder / "latin1.yaml"
    path.write_bytes("lr: 0.001 # réglé\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text: byte 13 is 0xe9"):
        read_config_file(path)


@pytest.mark.parametrize(("suffix", "text"), [(".json", "[" * 100_000), (".yaml", "a: " + "[" * 100_000)])
def test_a_deeply_nested_config_file_is_a_config_error(folder, suffix, text):
    path = folder / f"deep{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_config_file(path)


@pytest.mark.parametrize(("text", "key"), [("1: 2\n", "1"), ("~: x\n", "None"), ("true: 3\n", "True")])
def test_a_config_file_key_that_is_not_a_name_is_a_config_error(folder, text, key):
    path = folder / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"key {key} is not a name"):
        read_config_file(path)


def test_an_unknown_key_that_is_not_a_string_is_named():
    with pytest.raises(ConfigError, match="unknown MoEConfig key 3; valid keys: "):
        MoEConfig.from_dict({3: 1})


def test_a_missing_required_field_is_a_config_error():
    with pytest.raises(ConfigError, match="^MoEConfig needs expert_hidden_size$"):
        MoEConfig.from_dict({"num_experts": 4})
    with pytest.raises(ConfigError, match="^LMConfig needs vocab_size, hidden_size, "):
        LMConfig.from_dict({})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"data": ["a", 1]}, "data=('a', 1) is not valid: data takes a string or a list of strings or null"),
        ({"data": [None]}, "data takes a string or a list of strings or null"),
    ],
)
def test_the_elements_of_a_list_field_are_type_checked(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_options(options)
    assert TrainConfig.from_options({"data": ["a.txt", "b.txt"]}).data == ("a.txt", "b.txt")


def test_a_layer_list_of_the_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=re.escape("moe_layers takes a list of integers or null")):
        LMConfig.from_dict({**_DEMO, "moe_layers": [1, "2"]})


@pytest.mark.parametrize("field", ["time_budget", "checkpoint_every", "lr"])
def test_an_integer_too_large_for_a_number_is_a_config_error(field):
    with pytest.raises(ConfigError, match=rf"^{field}=1000+ is not valid: it is too large for a number"):
        TrainConfig.from_options({field: 10**400})
    assert TrainConfig.from_options({field: 10**300}) is not None  # large but a float: the field's own checks


def test_an_integer_option_of_more_than_4300_digits_stays_text():
    digits = "9" * 5000
    assert parse_overrides(["--max-steps", digits]) == {"max_steps": digits}
    with pytest.raises(ConfigError, match="max_steps takes an integer"):
        TrainConfig.from_options(parse_overrides(["--max-steps", digits]))


@pytest.mark.parametrize("value", ["true", "false", "8", "[1]"])
def test_a_model_moe_option_that_is_not_a_mapping_is_a_config_error(value):
    train = TrainConfig.from_options(parse_overrides(["--model.moe", value]))
    with pytest.raises(ConfigError, match=r"model.moe=.*: give null \(dense\) or model.moe.X settings"):
        resolve_lm_config(train.model, train.model_overrides, 256, 64)
    dense = TrainConfig.from_options(parse_overrides(["--model.moe", "null"]))
    assert resolve_lm_config(dense.model, dense.model_overrides, 256, 64).moe is None
