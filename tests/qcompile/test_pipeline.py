"""Pipeline text: parse, print back identically, validate against the registry, point at errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import qcompile.passes  # noqa: F401  (declares the built-in passes: the registry holds what is imported)
from qcompile.core.pass_api import PipelineError, registry
from qcompile.core.pipeline import PassSpec, Pipeline, ordering_violation, parse_pipeline
from qcompile.core.recipes import RECIPES
from tests.helpers import passes as toys

pytestmark = pytest.mark.usefixtures("toy_passes")  # the toy passes are registered for each test

# --- well-formed text round-trips ---------------------------------------------------------------

VALUES = {
    "count": st.integers(-5, 99).map(str),
    "mode": st.sampled_from(["fast", "exact"]),
    "flag": st.sampled_from(["true", "false", "1", "0", "yes", "no", "on", "off", "True"]),
    # any text without separators or whitespace, '=' and the empty string included
    "label": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=",{}"), max_size=6),
}


@st.composite
def specs(draw) -> str:
    name = draw(st.sampled_from(["test-noop", "test-add-node", "test-fail", "test-break-provenance"]))
    if name != "test-add-node":
        return name
    keys = draw(st.permutations(list(VALUES)))[: draw(st.integers(0, len(VALUES)))]
    if not keys:
        return name
    return name + "{" + ",".join(f"{k}={draw(VALUES[k])}" for k in keys) + "}"


@given(st.lists(specs(), max_size=5))
def test_well_formed_text_prints_back_identically(parts):
    text = ",".join(parts)
    pipeline = parse_pipeline(text)
    assert str(pipeline) == text
    assert [str(spec) for spec in pipeline] == parts


@given(st.text(st.sampled_from(list(",{}= ab-\t")), max_size=20))
def test_any_text_parses_or_gives_a_pipeline_error(text):
    try:
        parse_pipeline(text)
    except PipelineError:
        pass


def test_parsed_structure_keeps_option_order():
    pipeline = parse_pipeline("test-noop,test-add-node{label=a=b,count=3,mode=exact},test-noop")
    assert pipeline.names() == ["test-noop", "test-add-node", "test-noop"]
    assert pipeline[1] == PassSpec("test-add-node", {"label": "a=b", "count": "3", "mode": "exact"})
    assert list(pipeline[1].raw_options) == ["label", "count", "mode"]
    assert repr(pipeline) == "Pipeline('test-noop,test-add-node{label=a=b,count=3,mode=exact},test-noop')"


def test_empty_text_is_the_empty_pipeline():
    assert parse_pipeline("") == Pipeline() and str(parse_pipeline("")) == ""


def test_whitespace_and_empty_braces_are_tolerated_and_printed_canonically():
    assert str(parse_pipeline(" test-noop , test-add-node{ count = 2 ,mode=exact }, test-fail{} ")) == (
        "test-noop,test-add-node{count=2,mode=exact},test-fail"
    )


def test_empty_value_is_a_value():
    assert parse_pipeline("test-add-node{label=}")[0].options.label == ""


def test_instantiate_gives_fresh_passes_with_typed_options():
    pipeline = parse_pipeline("test-add-node{count=3,flag=on},test-noop")
    first, second = pipeline.instantiate(), pipeline.instantiate()
    assert [type(p) for p in first] == [toys.AddNode, toys.Noop]
    assert first[0].options == toys.AddNodeOptions(count=3, flag=True)
    assert first[0] is not second[0] and first[0].stats is not second[0].stats


def test_spec_of_a_pass_lists_all_effective_options():
    qpass = parse_pipeline("test-add-node{count=3}").instantiate()[0]
    assert str(PassSpec.of(qpass)) == "test-add-node{count=3,mode=fast,flag=false,label=x}"
    assert str(PassSpec.of(toys.Noop())) == "test-noop"


# --- validation against the registry -----------------------------------------------------------


def caret_column(message: str) -> int:
    *_, text_line, caret_line = message.splitlines()
    assert caret_line.strip() == "^"
    return caret_line.index("^") - 2


def test_unknown_pass_lists_registered_passes():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("test-noop,test-nope{a=1}")
    message = str(e.value)
    assert "unknown pass 'test-nope'" in message
    assert "test-noop" in message and "test-add-node" in message and "test-fail" in message
    assert caret_column(message) == len("test-noop,")


def test_unknown_option_key_lists_valid_keys():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("test-add-node{cnt=1}")
    assert "no option 'cnt'" in str(e.value) and "count, mode, flag, label" in str(e.value)


def test_option_of_a_pass_without_options():
    with pytest.raises(PipelineError, match="takes no options"):
        parse_pipeline("test-noop{a=1}")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("test-add-node{mode=slow}", "'slow' is not one of: fast, exact"),
        ("test-add-node{count=many}", "expected an integer, got 'many'"),
        ("test-add-node{flag=maybe}", "expected a boolean"),
    ],
)
def test_bad_option_value_says_what_is_valid(text, expected):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    assert expected in str(e.value) and text in str(e.value)


# --- malformed text: a caret under the position at fault ---------------------------------------


@pytest.mark.parametrize(
    "text, column, words",
    [
        ("test-add-node{count=1", 21, "expected '}'"),
        ("test-noop{", 10, "expected an option key"),
        ("test-noop}", 9, "unbalanced '}'"),
        ("test-add-node{count=1}}", 22, "unbalanced '}'"),
        ("test-add-node{count=1{", 21, "expected ',' or '}'"),
        (",test-noop", 0, "expected a pass name"),
        ("test-noop,", 10, "expected a pass name"),
        ("test-noop,,test-noop", 10, "expected a pass name"),
        ("{count=1}", 0, "expected a pass name"),
        ("test-add-node{count}", 19, "expected '='"),
        ("test-add-node{=1}", 14, "expected an option key"),
        ("test-add-node{count=1,}", 22, "expected an option key"),
        ("test-add-node{count=1,count=2}", 22, "duplicate option key 'count'"),
        ("test-add-node{count=1}test-noop", 22, "expected ','"),
        ("test-noop test-noop", 10, "expected ','"),
        ("test-add-node{label=a b}", 22, "expected ',' or '}'"),
    ],
)
def test_malformed_text_shows_a_caret(text, column, words):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    message = str(e.value)
    assert words in message
    assert message.splitlines()[-2] == "  " + text
    assert caret_column(message) == column


# --- without (Q4_DISABLE) ----------------------------------------------------------------------


def test_without_drops_every_occurrence():
    pipeline = parse_pipeline("test-noop,test-add-node{count=2},test-noop")
    assert str(pipeline.without(["test-noop"])) == "test-add-node{count=2}"
    assert str(pipeline.without("test-add-node")) == "test-noop,test-noop"
    assert str(pipeline) == "test-noop,test-add-node{count=2},test-noop"  # unchanged


def test_without_a_registered_pass_the_pipeline_lacks_is_a_no_op():
    pipeline = parse_pipeline("test-noop,test-add-node")
    assert str(pipeline.without(["test-fail"])) == "test-noop,test-add-node"


def test_without_an_unknown_pass_lists_the_registered_ones():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("test-noop,test-add-node").without(["test-nope"])
    assert "'test-nope'" in str(e.value) and "test-noop" in str(e.value) and "fuse-kernels" in str(e.value)


# --- ordering constraints the passes declare ---------------------------------------------------------


def test_a_pipeline_against_a_declared_order_is_rejected_when_parsed():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("analyze-outliers,fuse-kernels,insert-quantizers")
    lines = str(e.value).splitlines()
    assert lines[0].startswith("'fuse-kernels' must run after 'insert-quantizers' (fuse-kernels declares "
                               "after=insert-quantizers: it fuses the fake-quantized linears")
    # the caret is under the pass placed too late
    assert lines[1:] == ["  analyze-outliers,fuse-kernels,insert-quantizers",
                         "                                ^"]


def test_a_before_constraint_names_both_passes():
    with pytest.raises(PipelineError, match=r"'migrate-scales' must run before 'rotate-inputs' "
                                            r"\(migrate-scales declares before=rotate-inputs: "):
        parse_pipeline("rotate-inputs,migrate-scales")


def test_every_run_of_a_repeated_pass_is_bound():
    parse_pipeline("insert-quantizers{only=lm_head,skip=},insert-quantizers,fuse-kernels")
    assert ordering_violation(["insert-quantizers", "fuse-kernels", "insert-quantizers"]) is not None
    # a constraint binds only passes that are both in the pipeline
    assert ordering_violation(["fuse-kernels"]) is None and ordering_violation(["rotate-inputs"]) is None


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_keeps_the_declared_order(recipe):
    assert str(parse_pipeline(RECIPES[recipe])) == RECIPES[recipe]


def test_ordering_constraints_name_registered_passes():
    passes = registry()
    for name, cls in passes.items():
        for other in [*cls.after, *cls.before]:
            assert other in passes, f"{name} declares an order with {other!r}, which is no registered pass"


def test_a_pass_registered_outside_qcompile_declares_an_order_too(monkeypatch):
    monkeypatch.setattr(toys.Noop, "after", {"test-add-node": "it counts the nodes test-add-node adds"})
    parse_pipeline("test-add-node,test-noop")
    with pytest.raises(PipelineError, match=r"'test-noop' must run after 'test-add-node' \(test-noop declares "
                                            r"after=test-add-node: it counts the nodes test-add-node adds\)"):
        parse_pipeline("test-noop,test-add-node{count=2}")


def test_pipeline_order_of_the_declarations_and_a_cycle(monkeypatch):
    from qcompile.core.pass_api import in_pipeline_order

    monkeypatch.setattr(toys.Noop, "after", {"test-add-node": "why"})
    passes = {name: cls for name, cls in registry().items() if name in ("test-noop", "test-add-node", "test-fail")}
    assert in_pipeline_order(passes) == ["test-add-node", "test-fail", "test-noop"]
    monkeypatch.setattr(toys.AddNode, "after", {"test-noop": "why not"})
    with pytest.raises(PipelineError, match="test-add-node, test-noop form a cycle"):
        in_pipeline_order(passes)
