"""Prompt: safe rendering and a hash that covers everything a call depends on."""

from __future__ import annotations

import pytest

from engine import ConfigError, Example, MetricError, MetricResult, Prompt

from .conftest import qa_prompt


def test_render_substitutes_plain_names() -> None:
    """Placeholders are replaced; literal braces use the str.format escape."""
    p = Prompt([{"role": "user", "content": "Q: {question} {{json}}"}], model="m")
    assert p.render({"question": "2+2?"}) == [{"role": "user", "content": "Q: 2+2? {json}"}]


def test_data_with_braces_and_attribute_syntax_stays_text() -> None:
    """User data is never formatted again: {x.__class__} in data is copied verbatim."""
    p = Prompt([{"role": "user", "content": "{question}"}], model="m")
    nasty = "{question.__class__} {0} {__import__}"
    assert p.render({"question": nasty})[0]["content"] == nasty


@pytest.mark.parametrize("template", ["{x.__class__}", "{x[0]}", "{x!r}", "{x:>10}", "{0}", "{"])
def test_templates_with_attribute_index_or_format_access_are_rejected(template: str) -> None:
    """Only plain names are placeholders; anything else is a ConfigError at construction."""
    with pytest.raises(ConfigError):
        Prompt([{"role": "user", "content": template}], model="m")


def test_missing_and_extra_inputs_are_clear_errors() -> None:
    p = Prompt([{"role": "user", "content": "{a} and {b}"}], model="m")
    with pytest.raises(ConfigError, match=r"missing placeholder\(s\) \['b'\]"):
        p.render({"a": 1})
    with pytest.raises(ConfigError, match="'c'"):
        p.render({"a": 1, "b": 2, "c": 3})


def test_non_string_values_render_as_json() -> None:
    p = Prompt([{"role": "user", "content": "{a}"}], model="m")
    assert p.render({"a": {"k": [1, 2]}})[0]["content"] == '{"k": [1, 2]}'


def test_hash_covers_messages_model_params_and_response_format() -> None:
    """Any change that changes the call changes the hash; equal content, equal hash."""
    base = qa_prompt()
    assert qa_prompt().hash == base.hash
    variants = [
        qa_prompt(system="Answer briefly."),
        qa_prompt(model="other"),
        qa_prompt(temperature=0.7),
        qa_prompt(params={"max_tokens": 10}),
        qa_prompt(params={"top_p": 0.5}),
        qa_prompt(response_format={"type": "json_object"}),
    ]
    hashes = {v.hash for v in variants}
    assert base.hash not in hashes and len(hashes) == len(variants)


def test_hash_is_canonical_over_param_order() -> None:
    a = qa_prompt(params={"max_tokens": 5, "top_p": 0.5})
    b = qa_prompt(params={"top_p": 0.5, "max_tokens": 5})
    assert a.hash == b.hash


def test_prompt_is_immutable_and_round_trips() -> None:
    p = qa_prompt(params={"max_tokens": 5})
    with pytest.raises(TypeError):
        p.params["max_tokens"] = 6  # type: ignore[index]
    with pytest.raises(TypeError):
        p.messages[0]["content"] = "x"  # type: ignore[index]
    assert Prompt.from_dict(p.to_dict()) == p


def test_example_id_defaults_to_content_hash() -> None:
    a = Example({"q": "x"}, "y")
    assert a.id == Example({"q": "x"}, "z").id != Example({"q": "other"}, "y").id
    assert Example({"q": "x"}, id="mine").id == "mine"


@pytest.mark.parametrize("bad", [1.7, -0.1, float("nan"), "1"])
def test_metric_result_rejects_scores_outside_unit_interval(bad: object) -> None:
    with pytest.raises(MetricError):
        MetricResult(bad)  # type: ignore[arg-type]
