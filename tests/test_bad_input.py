"""Bad input fails before the first paid call, with a message naming the place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from adapters import ArithmeticCoach, ArithmeticModel, arithmetic_examples
from adapters.simulated_server import ServerConfig, SimulatedServer
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
from engine.cli import main
from engine.data import load_dataset
from engine.metrics import ExactMatch

from .conftest import echo_examples, echo_model, qa_prompt
from .support import RUN, rows

Case = Callable[[dict[str, Any]], None]


def _data(n: int = 8) -> list[Example]:
    return arithmetic_examples(n)


def _raising_metric(example: Example, prediction: str) -> float:
    raise ZeroDivisionError("bug in metric")


# Each case builds a value that its own constructor accepts, so the error can only come
# from optimize() itself: the edit runs *outside* pytest.raises below.
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
    "a row that is not an Example": (
        lambda kw: kw.update(trainset=[*_data(), {"question": "x"}]),
        "is a dict, not an engine.Example",
    ),
    "metric that raises": (lambda kw: kw.update(metric=_raising_metric), "ZeroDivisionError"),
    "metric returning NaN": (lambda kw: kw.update(metric=lambda e, p: float("nan")), "nan"),
    "metric returning 1.7": (lambda kw: kw.update(metric=lambda e, p: 1.7), "1.7"),
    "metric returning text": (lambda kw: kw.update(metric=lambda e, p: "good"), "str"),
    "money budget, unknown price": (
        lambda kw: kw.update(budget=Budget(max_cost=1.0)),
        "price for model",
    ),
    "batch_size 0": (lambda kw: kw.update(batch_size=0), "batch_size"),
    "history_size -1": (lambda kw: kw.update(history_size=-1), "history_size"),
    "parallel_proposals 1.5": (lambda kw: kw.update(parallel_proposals=1.5), "parallel_proposals"),
    "empty valset": (lambda kw: kw.update(valset=[]), "empty"),
    "valset with a bad row": (
        lambda kw: kw.update(valset=[Example({"text": "x"}, "1")]),
        "lack placeholder",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_bad_optimize_input_fails_before_any_call(name: str) -> None:
    """optimize() itself rejects the input (the edit is outside the raises block) and
    neither model is called."""
    model, coach = ArithmeticModel(), ArithmeticCoach()
    edit, message = CASES[name]
    kwargs: dict[str, Any] = {
        "prompt": qa_prompt(),
        "trainset": _data(),
        "metric": ExactMatch(),
        "model": model,
        "optimizer_model": coach,
    }
    edit(kwargs)  # a constructor that raised here would fail the test, not pass it
    prompt, trainset = kwargs.pop("prompt"), kwargs.pop("trainset")
    with pytest.raises((ConfigError, MetricError)) as info:
        await optimize(prompt, trainset, **kwargs)
    assert message.lower() in str(info.value).lower()
    assert model.calls == 0 and coach.calls == 0


# Values that cannot even be built: the constructor is the gate, so the check is here
# and not in optimize() (which only ever receives valid ones).
CONSTRUCTOR_CASES: dict[str, tuple[Callable[[], object], str]] = {
    "non-dict inputs": (lambda: Example(["a"], "1"), "must be a mapping"),  # type: ignore[arg-type]
    "non-JSON inputs": (lambda: Example({"question": object()}, "1"), "JSON"),
    "attribute placeholder": (
        lambda: Prompt([{"role": "user", "content": "{question.__class__}"}], model="m"),
        "not a plain name",
    ),
    "prompt without messages": (lambda: Prompt([], model="m"), "at least one message"),
    "negative limits": (lambda: Limits(rpm=-5), "rpm must be a positive"),
    "zero concurrency": (lambda: Limits(concurrency=0), "concurrency"),
    "zero retry attempts": (lambda: RetryPolicy(max_attempts=0), "max_attempts"),
    "negative budget": (lambda: Budget(max_calls=-1), "max_calls"),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTOR_CASES))
def test_invalid_values_cannot_be_constructed(name: str) -> None:
    """The engine's value objects refuse invalid settings when they are built."""
    build, message = CONSTRUCTOR_CASES[name]
    with pytest.raises(ConfigError) as info:
        build()
    assert message.lower() in str(info.value).lower()


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
    with pytest.raises(DataError, match="not a regular file \\(it is a directory\\)"):
        load_dataset(folder)  # a folder, not a file
    (tmp_path / "x.jsonl").write_bytes(b"\x80\x81")
    with pytest.raises(DataError, match=r"x\.jsonl: not UTF-8"):
        load_dataset(tmp_path / "x.jsonl")


# -- run files, datasets and output paths, through the CLI -----------------------------
# Each row edits a working run (real HTTP on loopback to the simulated provider), runs
# the CLI in-process and expects exit 2, a message naming the place, and zero requests.


def _edit(name: str, old: str, new: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))

    return edit


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def _symlink(folder: Path) -> None:
    (folder / "link.jsonl").symlink_to(folder / "elsewhere.jsonl")


RunCase = tuple[Callable[[Path], None], list[str], list[str]]  # edit, argv, message parts

RUN_FILE_CASES: dict[str, RunCase] = {
    "misspelled key: [budget] max_call": (
        _edit("run.toml", "max_calls = 100", "max_call = 10"),
        ["optimize"],
        ["run.toml:29: [budget] unknown key max_call; did you mean max_calls?"],
    ),
    "misspelled key: [cache] pth": (
        _edit("run.toml", 'path = "cache.sqlite"', 'pth = "cache.sqlite"'),
        ["optimize"],
        ["run.toml:33: [cache] unknown key pth; did you mean path?"],
    ),
    "misspelled section: [trainr]": (
        _edit("run.toml", "[trainer]", "[trainr]"),
        ["optimize"],
        ["run.toml:25: unknown section [trainr]; did you mean [trainer]?"],
    ),
    "misspelled key: temprature": (
        _edit("run.toml", "temperature = 0.0", "temprature = 0.0"),
        ["optimize"],
        ["run.toml:5: [prompt] unknown key temprature; did you mean temperature?"],
    ),
    "misspelled key: model_nam": (
        _edit("run.toml", 'model_name = "gpt-4o"', 'model_nam = "gpt-4o"'),
        ["optimize"],
        ["run.toml:23: [optimizer] unknown key model_nam; did you mean model_name?"],
    ),
    "key at the wrong level: [model] rpm": (
        _edit("run.toml", "limits = { rpm = 6000, concurrency = 8 }", "rpm = 6000"),
        ["optimize"],
        ["[model] unknown key rpm; did you mean [model.limits] rpm?"],
    ),
    "secret at section level: [model] api_key": (
        _edit("run.toml", "[model]\n", '[model]\napi_key = "sk-test-0123456789abcdef"\n'),
        ["optimize"],
        ["run.toml:16: [model] api_key holds a secret", "api_key_env"],
    ),
    "secret in options: api_key": (
        _edit(
            "run.toml", 'options = { base_url = "', 'options = { api_key = "hunter2", base_url = "'
        ),
        ["optimize"],
        ["[model] options.api_key holds a secret"],
    ),
    "secret in options: apiKey": (
        _edit(
            "run.toml", 'options = { base_url = "', 'options = { apiKey = "hunter2", base_url = "'
        ),
        ["optimize"],
        ["[model] options.apiKey holds a secret"],
    ),
    "secret in a nested header: Authorization": (
        _edit(
            "run.toml",
            "[trainer]",
            '[batch]\nadapter = "adapters.openai_batch:OpenAIBatch"\n'
            'options = { default_headers = { Authorization = "Basic aHVudGVyMg==" } }\n[trainer]',
        ),
        ["evaluate"],
        ["run.toml:27: [batch] options.default_headers.Authorization holds a secret"],
    ),
    "secret in metric options: token": (
        _edit("run.toml", "[metric]\n", '[metric]\noptions = { access_token = "hunter2" }\n'),
        ["optimize"],
        ["[metric] options.access_token holds a secret"],
    ),
    "credential-shaped value in a URL": (
        _edit("run.toml", '/v1" }', '/v1?api_key=abcdefghijklmnop" }'),
        ["optimize"],
        ["[model] options.base_url holds a value shaped like a credential"],
    ),
    "password in the cache url": (
        _edit(
            "run.toml", 'path = "cache.sqlite"', 'url = "postgresql://engine:hunter2@127.0.0.1/db"'
        ),
        ["optimize"],
        ["[cache] url holds a password"],
    ),
    "concurrency = 0": (
        _edit("run.toml", "concurrency = 8", "concurrency = 0"),
        ["optimize"],
        ["run.toml:18: [model.limits] concurrency must be an integer >= 1, got 0"],
    ),
    "prices entry with one number": (
        _edit("run.toml", "[0.15, 0.60]", "[0.15]"),
        ["optimize"],
        ["[budget] prices.gpt-4o-mini must be an array of length 2, got [0.15]"],
    ),
    "prices entry that is text": (
        _edit("run.toml", "[2.50, 10.00]", '"cheap"'),
        ["optimize"],
        ['[budget] prices.gpt-4o must be an array, got "cheap"'],
    ),
    "negative price": (
        _edit("run.toml", "[2.50, 10.00]", "[2.50, -1]"),
        ["optimize"],
        ["[budget] prices.gpt-4o[1] must be a number >= 0.0, got -1"],
    ),
    "wrong type: batch_size": (
        _edit("run.toml", "batch_size = 4", 'batch_size = "four"'),
        ["optimize"],
        ['run.toml:26: [trainer] batch_size must be an integer, got "four"'],
    ),
    "max_error_rate above 1": (
        _edit("run.toml", "batch_size = 4", "max_error_rate = 1.5"),
        ["optimize"],
        ["[trainer] max_error_rate must be a number <= 1.0, got 1.5"],
    ),
    "metric timeout as text": (
        _edit("run.toml", "[metric]\n", '[metric]\ntimeout = "60"\n'),
        ["optimize"],
        ['[metric] timeout must be a number, got "60"'],
    ),
    "cache path and url together": (
        _edit("run.toml", 'path = "cache.sqlite"', 'path = "c.sqlite"\nurl = "postgresql://h/db"'),
        ["optimize"],
        ["[cache] path and url exclude each other"],
    ),
    "misspelled section: [models]": (
        _edit("run.toml", "[model]\n", "[models]\n"),
        ["optimize"],
        ["run.toml:15: unknown section [models]; did you mean [model]?"],
    ),
    "null expected answer": (
        _write("train.jsonl", rows("t", 3) + '{"id": "t9", "question": "9", "answer": null}\n'),
        ["optimize"],
        ["train.jsonl:4: field 'answer' (the expected answer) is null"],
    ),
    "missing expected answer": (
        _write("train.jsonl", '{"id": "t9", "question": "9"}\n' + rows("t", 3)),
        ["optimize"],
        ["train.jsonl:1: missing field 'answer'"],
    ),
    "empty expected cell in a CSV": (
        lambda d: (
            _edit("run.toml", '"train.jsonl"', '"train.csv"')(d),
            (d / "train.csv").write_text("id,question,answer\nc1,1 + 1,2\nc2,2 + 2,\n"),
        ),
        ["optimize"],
        ["train.csv:3: field 'answer' (the expected answer) is empty"],
    ),
    "same id, different inputs in train and val": (
        _write("val.jsonl", '{"id": "t2", "question": "something else", "answer": "1"}\n'),
        ["optimize"],
        [
            "val.jsonl:1: id 't2' is also in the training set",
            "train.jsonl:3) with different inputs",
        ],
    ),
    "same id, different inputs, in --dry-run": (
        _write("val.jsonl", '{"id": "t2", "question": "something else", "answer": "1"}\n'),
        ["optimize", "--dry-run"],
        ["val.jsonl:1: id 't2' is also in the training set"],
    ),
    "row without the prompt's placeholder, in --dry-run": (
        _write("train.jsonl", rows("t", 2) + '{"id": "t9", "q": "9", "answer": "10"}\n'),
        ["optimize", "--dry-run"],
        [
            "train.jsonl:3: [data] train: example #2 (id='t9'): inputs lack placeholder(s) ['question']",
            "; the rows have: q; rename the column or the {placeholder}",
        ],
    ),
    "adapter module that does not exist suggests the one that does": (
        _edit(
            "run.toml",
            '"adapters.openai_chat:OpenAIChat"\noptions',
            '"adapters.openai:OpenAIChat"\noptions',
        ),
        ["optimize", "--dry-run"],
        [
            "run.toml:16: [model] adapter: cannot import 'adapters.openai'",
            "did you mean 'adapters.openai_chat:OpenAIChat'",
        ],
    ),
    "data file that does not exist names the run file's line and the rule": (
        _edit("run.toml", '"val.jsonl"', '"vall.jsonl"'),
        ["optimize", "--dry-run"],
        ["run.toml:9: [data] val: no such file", "relative to the run file's folder"],
    ),
    "inputs as one string names one column": (
        lambda d: (
            _edit("run.toml", 'expected = "answer"', 'expected = "answer"\ninputs = "question"')(d),
            (d / "train.jsonl").write_text('{"id": "x", "query": "1", "answer": "1"}\n'),
        ),
        ["optimize"],
        ["train.jsonl:1: missing input column(s) ['question']"],
    ),
    "metric that does not exist, in --dry-run": (
        _edit("run.toml", "engine.metrics:ExactMatch", "engine.metrics:Nope"),
        ["optimize", "--dry-run"],
        ["has no attribute 'Nope'"],
    ),
    "optimize --out an existing file": (
        _write("notes.txt", "keep me"),
        ["optimize", "--out", "notes.txt"],
        ["--out", "notes.txt: exists and is not a folder"],
    ),
    "[output] dir that is a file": (
        _edit("run.toml", 'dir = "out"', 'dir = "train.jsonl"'),
        ["optimize"],
        ["[output] dir", "train.jsonl: exists and is not a folder"],
    ),
    "evaluate --out the val dataset": (
        lambda d: None,
        ["evaluate", "--split", "val", "--out", "val.jsonl"],
        ["val.jsonl: is the [data] val dataset, an input of this run"],
    ),
    "evaluate --out the run file": (
        lambda d: None,
        ["evaluate", "--out", "run.toml"],
        ["run.toml: is the run file, an input of this run"],
    ),
    "evaluate --out the cache file": (
        lambda d: None,
        ["evaluate", "--out", "cache.sqlite"],
        ["cache.sqlite: is the [cache] file, an input of this run"],
    ),
    "evaluate --out a symbolic link": (
        _symlink,
        ["evaluate", "--out", "link.jsonl"],
        ["link.jsonl: is a symbolic link; outputs never follow links"],
    ),
    "evaluate --out a folder": (
        lambda d: (d / "results").mkdir(),
        ["evaluate", "--out", "results"],
        ["results: is a folder, a file is wanted"],
    ),
    "evaluate --out under a file": (
        lambda d: None,
        ["evaluate", "--out", "train.jsonl/results.jsonl"],
        ["train.jsonl/results.jsonl: cannot be created", "is a file, not a folder"],
    ),
}


@pytest.fixture(scope="module")
def provider() -> Iterator[SimulatedServer]:
    with SimulatedServer(ServerConfig()) as server:
        yield server


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """The CLI configures structlog for its process; put the test process's back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.parametrize("name", sorted(RUN_FILE_CASES))
def test_bad_run_file_data_or_output_exits_2_before_any_call(
    name: str,
    tmp_path: Path,
    provider: SimulatedServer,
    capsys: pytest.CaptureFixture[str],
    restore_structlog: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exit 2, a message naming file:line or option and the key, no request, no files."""
    (tmp_path / "run.toml").write_text(RUN.replace("BASE_URL", provider.base_url))
    (tmp_path / "train.jsonl").write_text(rows("t", 8))
    (tmp_path / "val.jsonl").write_text(rows("v", 4))
    edit, argv, parts = RUN_FILE_CASES[name]
    edit(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    received = provider.stats.received
    monkeypatch.chdir(tmp_path)  # relative --out paths, as a user types them
    code = main([argv[0], "run.toml", "--quiet", *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2, err
    for part in parts:
        assert part in err, (part, err)
    assert "Traceback" not in err and "hunter2" not in err and "0123456789abcdef" not in err
    assert provider.stats.received == received
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache, no out folder


@pytest.mark.parametrize(
    ("make", "score"),
    [
        (lambda np, ok: np.bool_(ok), 1.0),
        (lambda np, ok: np.int64(int(ok)), 1.0),
        (lambda np, ok: np.float32(0.5), 0.5),
        (lambda np, ok: np.array(0.25), 0.25),  # a 0-d array is a scalar too
    ],
)
async def test_numpy_scalars_from_a_metric_are_scores(make: Any, score: float) -> None:
    """A metric built on NumPy may return its scalars; numpy.bool_ is not 'got bool'."""
    np = pytest.importorskip("numpy")

    def metric(example: Example, prediction: str) -> Any:
        return make(np, prediction.strip() == str(example.expected))

    data = echo_examples(8)  # the echo model answers every one right
    result = await evaluate(qa_prompt(), data, model=echo_model(), metric=metric)
    assert result.errors == 0 and result.scored == 8 and result.score == score


async def test_a_numpy_array_is_not_a_score() -> None:
    """An array of several numbers is refused before the first call."""
    np = pytest.importorskip("numpy")
    model = ArithmeticModel()
    with pytest.raises(MetricError, match="got ndarray"):
        await evaluate(qa_prompt(), _data(), model=model, metric=lambda e, p: np.array([1.0, 0.0]))
    assert model.calls == 0
