"""Bad input fails before the first paid call, with a message naming the place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapters import ArithmeticCoach, ArithmeticModel, arithmetic_examples
from engine import (
    Budget,
    ConfigError,
    DataError,
    Example,
    Limits,
    MetricError,
    Prompt,
    RetryPolicy,
    evaluate,
    optimize,
)
from engine.data import load_dataset
from engine.metrics import ExactMatch

from .conftest import qa_prompt

Case = Callable[[dict[str, Any]], None]


def _data(n: int = 8) -> list[Example]:
    return arithmetic_examples(n)


def _raising_metric(example: Example, prediction: str) -> float:
    raise ZeroDivisionError("bug in metric")


CASES: dict[str, tuple[Case, str]] = {
    "empty trainset": (lambda kw: kw.update(trainset=[]), "empty"),
    "duplicate ids": (
        lambda kw: kw.update(trainset=[*_data(), Example({"question": "x"}, "1", id="q0")]),
        "duplicate example id 'q0'",
    ),
    "missing placeholder": (
        lambda kw: kw.update(trainset=[*_data(), Example({"q": "x"}, "1", id="z")]),
        "lack placeholder",
    ),
    "extra input": (
        lambda kw: kw.update(
            trainset=[*_data(), Example({"question": "x", "hint": 1}, "1", id="z")]
        ),
        "not placeholders",
    ),
    "non-dict inputs": (lambda kw: kw.update(trainset=[Example(["a"], "1")]), "must be a mapping"),  # type: ignore[arg-type]
    "non-JSON inputs": (
        lambda kw: kw.update(trainset=[Example({"question": object()}, "1")]),
        "JSON",
    ),
    "attribute placeholder": (
        lambda kw: kw.update(
            prompt=Prompt([{"role": "user", "content": "{question.__class__}"}], model="m")
        ),
        "not a plain name",
    ),
    "prompt without messages": (
        lambda kw: kw.update(prompt=Prompt([], model="m")),
        "at least one message",
    ),
    "metric that raises": (lambda kw: kw.update(metric=_raising_metric), "ZeroDivisionError"),
    "metric returning NaN": (lambda kw: kw.update(metric=lambda e, p: float("nan")), "nan"),
    "metric returning 1.7": (lambda kw: kw.update(metric=lambda e, p: 1.7), "1.7"),
    "metric returning text": (lambda kw: kw.update(metric=lambda e, p: "good"), "str"),
    "money budget, unknown price": (
        lambda kw: kw.update(budget=Budget(max_cost=1.0)),
        "price for model",
    ),
    "negative limits": (lambda kw: kw.update(limits=Limits(rpm=-5)), "rpm must be a positive"),
    "zero concurrency": (lambda kw: kw.update(limits=Limits(concurrency=0)), "concurrency"),
    "batch_size 0": (lambda kw: kw.update(batch_size=0), "batch_size"),
    "history_size -1": (lambda kw: kw.update(history_size=-1), "history_size"),
    "parallel_proposals 1.5": (lambda kw: kw.update(parallel_proposals=1.5), "parallel_proposals"),
    "empty valset": (lambda kw: kw.update(valset=[]), "empty"),
    "valset with a bad row": (
        lambda kw: kw.update(valset=[Example({"text": "x"}, "1")]),
        "lack placeholder",
    ),
    "zero retry attempts": (
        lambda kw: kw.update(model=RetryPolicy(max_attempts=0)),
        "max_attempts",
    ),
    "negative budget": (lambda kw: kw.update(budget=Budget(max_calls=-1)), "max_calls"),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_bad_optimize_input_fails_before_any_call(name: str) -> None:
    model, coach = ArithmeticModel(), ArithmeticCoach()
    edit, message = CASES[name]
    kwargs: dict[str, Any] = {
        "prompt": qa_prompt(),
        "trainset": _data(),
        "metric": ExactMatch(),
        "model": model,
        "optimizer_model": coach,
    }
    with pytest.raises((ConfigError, MetricError)) as info:
        edit(kwargs)
        await optimize(kwargs.pop("prompt"), kwargs.pop("trainset"), **kwargs)
    assert message.lower() in str(info.value).lower()
    assert model.calls == 0 and coach.calls == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"must_beat": 1.5}, "must_beat"),
        ({"on_error": "ignore"}, "on_error"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
async def test_bad_evaluate_options_fail_before_any_call(
    kwargs: dict[str, Any], message: str
) -> None:
    model = ArithmeticModel()
    with pytest.raises(ConfigError, match=message):
        await evaluate(qa_prompt(), _data(), model=model, metric=ExactMatch(), **kwargs)
    assert model.calls == 0


def test_unreadable_dataset_paths(tmp_path: Path) -> None:
    folder = tmp_path / "looks.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match="no such file"):
        load_dataset(folder)  # a folder, not a file
    (tmp_path / "x.jsonl").write_bytes(b"\x80\x81")
    with pytest.raises(DataError, match=r"x\.jsonl: not UTF-8"):
        load_dataset(tmp_path / "x.jsonl")
