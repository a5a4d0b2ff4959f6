"""Options dict + Q4_* environment -> Q4Options."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from qcompile.core.config import Q4Options, env_names, resolve_options


def resolve(options=None, **environ):
    return resolve_options(options, environ=environ)


def test_defaults():
    assert resolve() == resolve({}) == Q4Options()


def test_every_documented_variable_is_read():
    documented = {"Q4_PIPELINE", "Q4_PRINT_BEFORE", "Q4_PRINT_AFTER", "Q4_PRINT_AFTER_ALL", "Q4_PRINT_AFTER_CHANGE",
                  "Q4_PRINT_AFTER_FAILURE", "Q4_DUMP_DIR", "Q4_VERIFY_EACH", "Q4_TIMING", "Q4_STATS", "Q4_MEMORY", "Q4_DISABLE",
                  "Q4_LOWER", "Q4_RECIPE"}
    assert documented <= set(env_names())
    assert "Q4_CALIBRATION" not in env_names()  # an object, not text


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        resolve({"recipes": "w4a4-rtn"})
    message = str(e.value)
    assert "'recipes' (did you mean 'recipe'?)" in message
    for field in dataclasses.fields(Q4Options):
        assert field.name in message


@pytest.mark.parametrize(
    "options, words",
    [
        ({"recipe": 4}, "option 'recipe': expected str, got int 4"),
        ({"pipeline": 4}, "option 'pipeline': expected str or None"),
        ({"timing": "yes"}, "option 'timing': expected bool"),
        ({"lower": "tvm"}, "option 'lower': 'tvm' is not one of: inductor, eager"),
        ({"print_after": [1]}, "option 'print_after': expected pass names"),
    ],
)
def test_wrong_type_or_value(options, words):
    with pytest.raises((TypeError, ValueError)) as e:
        resolve(options)
    assert words in str(e.value)


def test_options_must_be_a_dict():
    with pytest.raises(TypeError, match="must be a dict, got list"):
        resolve([("timing", True)])


def test_values_are_normalized():
    opts = resolve({"print_after": ["a", "b"], "disable": "c, d", "calibration": [[1]], "pipeline": None})
    assert opts.print_after == ("a", "b") and opts.disable == ("c", "d") and opts.calibration == [[1]]


def test_environment_overrides_the_options_dict():
    opts = resolve({"timing": False, "pipeline": "test-noop", "lower": "inductor", "print_after": ("x",)},
                   Q4_TIMING="on", Q4_PIPELINE="test-add-node", Q4_LOWER="eager", Q4_PRINT_AFTER="a, b,",
                   Q4_DUMP_DIR="/tmp/d")
    assert opts.timing is True and opts.pipeline == "test-add-node" and opts.lower == "eager"
    assert opts.print_after == ("a", "b") and opts.dump_dir == "/tmp/d"


def test_empty_pipeline_variable_is_the_empty_pipeline():
    assert resolve({"pipeline": "test-noop"}, Q4_PIPELINE="").pipeline == ""


@pytest.mark.parametrize("text, value", [(t, True) for t in ("1", "true", "YES", "on")]
                         + [(t, False) for t in ("0", "False", "no", "off")])
def test_boolean_spellings(text, value):
    assert resolve(Q4_VERIFY_EACH=text).verify_each is value


def test_bad_boolean_names_the_variable():
    with pytest.raises(ValueError) as e:
        resolve(Q4_PRINT_AFTER_ALL="maybe")
    assert "Q4_PRINT_AFTER_ALL" in str(e.value) and "'maybe'" in str(e.value)


def test_bad_environment_choice_names_the_variable():
    with pytest.raises(ValueError, match="Q4_LOWER: 'tvm' is not one of: inductor, eager"):
        resolve(Q4_LOWER="tvm")


def test_unknown_q4_variable_warns_once_listing_valid_names():
    with pytest.warns(UserWarning) as record:
        opts = resolve(Q4_PIPELNE="x", Q4_TIMMING="1", PATH="/bin")
    assert len(record) == 1
    message = str(record[0].message)
    assert "'Q4_PIPELNE' (did you mean 'Q4_PIPELINE'?)" in message and "'Q4_TIMMING'" in message
    assert "Q4_PRINT_AFTER_ALL" in message and "PATH" not in message.split(";")[0]
    assert opts == Q4Options()


def test_known_variables_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve(Q4_TIMING="1", Q4_STATS="0", HOME="/root")


def test_environment_is_read_once():
    class Environ(dict):
        reads = 0

        def items(self):
            Environ.reads += 1
            return super().items()

        def __getitem__(self, key):  # only items() may be used: one snapshot
            raise AssertionError("read one variable at a time")

        get = __getitem__

    resolve_options({"timing": True}, environ=Environ(Q4_STATS="1"))
    assert Environ.reads == 1
