"""Run files on a declared schema: every key known, typed, placed; secrets refused."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from engine import ConfigError, Limits, RetryPolicy
from engine._redact import REDACTED, redact_value
from engine._secrets import is_secret_name
from engine.cli._runfile import ClusterSpec, load_run_file
from engine.metrics import mean

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
[prompt]
messages = [{ role = "system", content = "Answer." }, { role = "user", content = "{question}" }]
model = "demo"

[data]
train = "train.jsonl"
expected = "answer"

[model]
adapter = "adapters.scripted:ArithmeticModel"
"""

EVERY_KEY = """\
[prompt]
messages = [{ role = "user", content = "{question}" }]
model = "demo"
temperature = 0
params = { max_tokens = 16 }
response_format = { type = "json_object" }

[data]
train = "train.jsonl"
val = "val.jsonl"
inputs = "question"
expected = "answer"
id = "id"
metadata = ["source"]

[metric]
use = "engine.metrics:ExactMatch"
options = { case_sensitive = true }
global = "engine.metrics:mean"
timeout = 5
threads = 3

[model]
adapter = "adapters.scripted:ArithmeticModel"
options = { latency = 0.0 }
model_name = "demo"
api_key_env = "DEMO_KEY"
cache_namespace = "shared-demo"
limits = { rpm = 600, tpm = 100000, concurrency = 4, burst = 2 }

[model.retry]
max_attempts = 3
base_delay = 0.1
max_delay = 2
timeout = 10
deadline = false
max_retry_after = 30
circuit_breaker = false
hedge_after = "p95"

[optimizer]
adapter = "adapters.scripted:ArithmeticCoach"
model_name = "coach"

[trainer]
batch_size = 2
max_proposals_per_step = 3
history_size = 2
seed = 7
racing = false
parallel_proposals = 2
task_description = "add numbers"
metric_description = "exact"
max_error_rate = 0.1

[budget]
max_calls = 10
max_tokens = 1000
max_cost = 0.5
prices = { demo = [0.1, 0.2], coach = [1, 2] }

[cache]
url = "postgresql://engine@127.0.0.1:5432/engine"
flush_interval = 0.5

[cluster]
address = "ray://127.0.0.1:10001"
workers = 2

[output]
dir = "results"
"""


def _write(folder: Path, text: str) -> Path:
    rows = "".join(
        f'{{"id": "r{i}", "question": "{i}+1", "answer": "{i + 1}", "source": "s"}}\n'
        for i in range(4)
    )
    (folder / "train.jsonl").write_text(rows)
    (folder / "val.jsonl").write_text(rows.replace('"r', '"v'))
    path = folder / "run.toml"
    path.write_text(text)
    return path


def _error(folder: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_file(_write(folder, text))
    return str(info.value)


def test_the_bundled_demo_loads() -> None:
    """examples/demo.toml is valid under the schema and keeps its settings."""
    run = load_run_file(ROOT / "examples" / "demo.toml")
    assert run.model.limits == Limits(rpm=6000, concurrency=16)
    assert run.trainer == {"batch_size": 4, "max_proposals_per_step": 5, "seed": 42}
    assert run.optimizer is not None and run.optimizer.model_name == "coach"
    assert run.budget is not None and run.budget.max_calls == 5000
    assert len(run.train) == 40 and run.val is not None and len(run.val) == 20
    assert run.prompt_file == (ROOT / "examples" / "prompt.json").resolve()


def test_every_key_reaches_the_run_file(tmp_path: Path) -> None:
    """Each declared key is parsed into the attribute that carries it."""
    run = load_run_file(_write(tmp_path, EVERY_KEY))
    assert run.prompt.params == {"max_tokens": 16, "temperature": 0}
    assert [dict(e.inputs) for e in run.train[:1]] == [{"question": "0+1"}]
    assert run.train[0].metadata == {"source": "s"}
    assert run.global_metric_spec == "engine.metrics:mean" and run.build_global_metric() is mean
    assert (run.metric_timeout, run.metric_threads) == (5.0, 3)
    assert run.model.cache_namespace == "shared-demo" and run.model.api_key_env == "DEMO_KEY"
    assert run.model.limits == Limits(rpm=600, tpm=100000, concurrency=4, burst=2)
    assert run.model.retry == RetryPolicy(
        max_attempts=3,
        base_delay=0.1,
        max_delay=2,
        timeout=10,
        deadline=None,
        max_retry_after=30,
        circuit_breaker=None,
        hedge_after="p95",
    )
    assert run.trainer == {
        "batch_size": 2,
        "max_proposals_per_step": 3,
        "history_size": 2,
        "seed": 7,
        "racing": False,
        "parallel_proposals": 2,
        "task_description": "add numbers",
        "metric_description": "exact",
        "max_error_rate": 0.1,
    }
    assert run.budget is not None and run.budget.prices["coach"].output_per_million == 2
    assert run.cache_url == "postgresql://engine@127.0.0.1:5432/engine" and run.cache_path is None
    assert run.cache_flush_interval == 0.5
    assert run.cluster == ClusterSpec(address="ray://127.0.0.1:10001", workers=2)
    assert run.output_dir == tmp_path / "results"


@pytest.mark.parametrize(("value", "after"), [("2.5", 2.5), ("3", 3.0), ("false", None)])
def test_hedge_after_takes_seconds_or_false(
    tmp_path: Path, value: str, after: float | None
) -> None:
    run = load_run_file(_write(tmp_path, BASE + f"\n[model.retry]\nhedge_after = {value}\n"))
    assert run.model.retry == RetryPolicy(hedge_after=after)


def test_defaults_when_keys_are_absent(tmp_path: Path) -> None:
    """A minimal file gets the engine's defaults, and no global metric (the mean)."""
    run = load_run_file(_write(tmp_path, BASE))
    assert run.metric_spec == "engine.metrics:ExactMatch" and run.build_global_metric() is None
    assert (run.metric_timeout, run.metric_threads, run.cluster, run.cache_url) == (
        60.0,
        None,
        None,
        None,
    )
    assert run.trainer == {} and run.budget is None and run.cache_flush_interval == 0.2
    assert run.model.retry is None and run.model.limits is None and run.optimizer is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[trainer]\nbach_size = 2\n",
            "run.toml:13: [trainer] unknown key bach_size; did you mean batch_size?",
        ),
        (
            "[budget]\nmax_call = 10\n",
            "run.toml:13: [budget] unknown key max_call; did you mean max_calls?",
        ),
        ("[cache]\npth = 'c.sqlite'\n", "run.toml:13: [cache] unknown key pth; did you mean path?"),
        ("[trainr]\nseed = 1\n", "run.toml:12: unknown section [trainr]; did you mean [trainer]?"),
        ("[metric]\nglobl = 'm:f'\n", "[metric] unknown key globl; did you mean global?"),
        (
            "[model.limits]\nrmp = 5\n",
            "run.toml:13: [model.limits] unknown key rmp; did you mean rpm?",
        ),
        (
            "[model.retry]\nattempts = 5\n",
            "[model.retry] unknown key attempts; did you mean max_attempts?",
        ),
        ("[cluster]\nworker = 2\n", "[cluster] unknown key worker; did you mean workers?"),
        ("[output]\ndirectory = 'x'\n", "[output] unknown key directory; did you mean dir?"),
        ("[budget]\nrpm = 5\n", "[budget] unknown key rpm; did you mean [model.limits] rpm?"),
        ("[completely_new]\nx = 1\n", "unknown section [completely_new]\n"),
    ],
)
def test_unknown_keys_name_the_place_and_suggest(tmp_path: Path, text: str, message: str) -> None:
    """A typo is never ignored: file:line, section, key and a did-you-mean."""
    assert message.strip() in _error(tmp_path, BASE + "\n" + text)


def test_every_unknown_key_is_listed_at_once(tmp_path: Path) -> None:
    """Three typos, three lines: fix them all in one go."""
    text = BASE.replace('model = "demo"', 'model = "demo"\ntemprature = 0') + (
        '\n[optimizer]\nadapter = "m:C"\nmodel_nam = "x"\n\n[budget]\nmax_call = 1\n'
    )
    lines = _error(tmp_path, text).splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "[prompt] unknown key temprature; did you mean temperature?",
        "[optimizer] unknown key model_nam; did you mean model_name?",
        "[budget] unknown key max_call; did you mean max_calls?",
    ]
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in lines] == ["4", "15", "18"]


def test_unknown_keys_are_found_before_any_dataset_is_read(tmp_path: Path) -> None:
    """The file is checked whole first: a missing dataset does not hide a typo."""
    path = tmp_path / "run.toml"
    path.write_text(BASE.replace("train.jsonl", "missing.jsonl") + "\n[budget]\nmax_call = 3\n")
    with pytest.raises(ConfigError, match="did you mean max_calls"):
        load_run_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[trainer]\nbatch_size = "four"\n', '[trainer] batch_size must be an integer, got "four"'),
        ("[trainer]\nbatch_size = 0\n", "[trainer] batch_size must be an integer >= 1, got 0"),
        ("[trainer]\nracing = 1\n", "[trainer] racing must be true or false, got 1"),
        ("[trainer]\nmax_error_rate = -0.1\n", "[trainer] max_error_rate must be a number >= 0.0"),
        (
            "[model.limits]\nconcurrency = 0\n",
            "[model.limits] concurrency must be an integer >= 1, got 0",
        ),
        (
            "[model.limits]\nconcurrency = 2.5\n",
            "[model.limits] concurrency must be an integer, got 2.5",
        ),
        ("[model.limits]\nrpm = 0\n", "[model.limits] rpm must be a number > 0.0, got 0"),
        ("[model.retry]\ntimeout = true\n", "[model.retry] timeout = true means nothing"),
        (
            "[model.retry]\ncircuit_breaker = 0\n",
            "[model.retry] circuit_breaker must be an integer >= 1",
        ),
        ("[model.retry]\nhedge_after = 0\n", "[model.retry] hedge_after must be a number > 0.0"),
        (
            '[model.retry]\nhedge_after = "p99"\n',
            'run.toml:13: [model.retry] hedge_after must be finite seconds > 0 or "p95" (the '
            'observed p95 latency), got "p99"',
        ),
        (
            "[model.retry]\nhedge_after = inf\n",
            'run.toml:13: [model.retry] hedge_after must be finite seconds > 0 or "p95"',
        ),
        ("[model.retry]\nhedge_after = true\n", "[model.retry] hedge_after = true means nothing"),
        ("[budget]\nmax_calls = -1\n", "[budget] max_calls must be an integer >= 1, got -1"),
        (
            "[budget]\nprices = { demo = [1] }\n",
            "[budget] prices.demo must be an array of length 2, got [1]",
        ),
        (
            '[budget]\nprices = { demo = ["a", 1] }\n',
            '[budget] prices.demo[0] must be a number, got "a"',
        ),
        ("[budget]\nprices = { demo = 3 }\n", "[budget] prices.demo must be an array, got 3"),
        (
            "[cache]\nflush_interval = 10\n",
            "[cache] flush_interval must be a number <= 5.0, got 10",
        ),
        ("[cache]\nurl = 'sqlite:///x'\n", "[cache] url must start with postgresql://"),
        (
            "[cluster]\naddress = 'ray://host'\n",
            "[cluster] address must be 'local', 'auto' or 'ray://host:port'",
        ),
        ("[cluster]\nworkers = 0\n", "[cluster] workers must be an integer >= 1, got 0"),
        ("[metric]\ntimeout = 0\n", "[metric] timeout must be a number > 0.0, got 0"),
        ("[metric]\nthreads = 0\n", "[metric] threads must be an integer >= 1, got 0"),
        ("[metric]\nuse = 'ExactMatch'\n", "[metric] use must be 'module:callable'"),
        ("[metric]\nglobal = 3\n", "[metric] global must be a string, got 3"),
        ("[output]\ndir = ['a']\n", '[output] dir must be a string, got ["a"]'),
        ("[optimizer]\nmodel_name = 'x'\n", "[optimizer] adapter is required"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(
    tmp_path: Path, text: str, message: str
) -> None:
    """Types and ranges come from the schema; the message says what was expected."""
    assert message in _error(tmp_path, BASE + "\n" + text)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('model = "demo"\n', "", "[prompt] model is required"),
        ('train = "train.jsonl"\n', "", "[data] train is required"),
        (
            '[model]\nadapter = "adapters.scripted:ArithmeticModel"\n',
            "",
            "[model] section is required",
        ),
        ("[prompt]\n", "[prompt]\nfile = 'p.json'\n", "[prompt] has both file and messages"),
        (
            'model = "demo"',
            'model = "demo"\ntemperature = "hot"',
            '[prompt] temperature must be a number, got "hot"',
        ),
        (
            'expected = "answer"',
            'expected = "answer"\ninputs = [1]',
            "[data] inputs[0] must be a string, got 1",
        ),
        (
            'adapter = "adapters.scripted:ArithmeticModel"',
            'adapter = "scripted"',
            "[model] adapter must be 'module:Class'",
        ),
    ],
)
def test_required_keys_and_cross_key_rules(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    """Required sections and keys, and rules that span keys, are errors naming them."""
    assert message in _error(tmp_path, BASE.replace(old, new, 1))


MODEL = 'adapter = "adapters.scripted:ArithmeticModel"\n'


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (MODEL, MODEL + 'api_key = "sk-abcdefghijklmnop"\n'),
        (MODEL, MODEL + 'options = { api_key = "hunter2" }\n'),
        (MODEL, MODEL + 'options = { "API-Key" = "hunter2" }\n'),
        (MODEL, MODEL + 'options = { apiKey = "hunter2" }\n'),
        (MODEL, MODEL + 'options = { client_secret = "hunter2" }\n'),
        (MODEL, MODEL + 'options = { default_headers = { Authorization = "hunter2" } }\n'),
        (MODEL, MODEL + 'password = "hunter2"\n'),
        (MODEL, MODEL + 'token = "hunter2"\n'),
        (MODEL, MODEL + 'options = { base_url = "https://h/v1?api_key=hunter2hunter2" }\n'),
        (MODEL, MODEL + 'options = { base_url = "sk-abcdefghijklmnop" }\n'),
        (MODEL, MODEL + '[model.limits]\nkey = "hunter2"\n'),
        ("[prompt]\n", 'api_key = "hunter2"\n[prompt]\n'),
        (MODEL, MODEL + '[metric]\noptions = { judge_api_key = "hunter2" }\n'),
        ('model = "demo"\n', 'model = "demo"\nparams = { api_key = "hunter2" }\n'),
        (MODEL, MODEL + '[cache]\nurl = "postgresql://u:hunter2@h/db"\n'),
    ],
)
def test_secrets_are_refused_anywhere(tmp_path: Path, old: str, new: str) -> None:
    """A secret in a run file is exit 2, and the message never repeats it."""
    message = _error(tmp_path, BASE.replace(old, new, 1))
    assert "secret" in message or "password" in message or "credential" in message
    assert "hunter2" not in message and "abcdefghijklmnop" not in message


@pytest.mark.parametrize(
    "name",
    [
        "api_key",
        "apiKey",
        "X-Api-Key",
        "Authorization",
        "access_token",
        "client_secret",
        "db_password",
        "key",
        "api_key_env",
        "max_tokens",
        "tokens",
        "model_name",
        "cache_namespace",
        "password_file",
    ],
)
def test_one_secret_rule_for_run_files_and_redaction(tmp_path: Path, name: str) -> None:
    """The run file refuses exactly the option names that events redact."""
    redacted = redact_value({name: "value"})[name] == REDACTED
    text = BASE + f'options = {{ "{name}" = "value" }}\n'
    try:
        load_run_file(_write(tmp_path, text))
        refused = False
    except ConfigError as exc:
        refused = "holds a secret" in str(exc)
    assert redacted == refused == is_secret_name(name)
    assert is_secret_name(name) == (
        name
        not in {
            "api_key_env",
            "max_tokens",
            "tokens",
            "model_name",
            "cache_namespace",
            "password_file",
        }
    )


def test_free_form_names_are_not_mistaken_for_secrets(tmp_path: Path) -> None:
    """Model names in prices and a response format's fields are the user's words."""
    text = BASE.replace(
        'model = "demo"',
        'model = "demo"\nresponse_format = { type = "json_schema", '
        'json_schema = { properties = { token = { type = "string" } } } }',
    )
    text += '\n[budget]\nprices = { "token-counter" = [1, 2] }\n'
    run = load_run_file(_write(tmp_path, text))
    assert run.budget is not None and "token-counter" in run.budget.prices


def test_a_single_inputs_string_is_one_column(tmp_path: Path) -> None:
    """inputs = "question" is the column question, not q, u, e, s, t, i, o, n."""
    run = load_run_file(
        _write(
            tmp_path,
            BASE.replace('expected = "answer"', 'expected = "answer"\ninputs = "question"'),
        )
    )
    assert {tuple(e.inputs) for e in run.train} == {("question",)}


def test_global_metric_is_resolved_and_checked(tmp_path: Path) -> None:
    """[metric] global must name a callable; a class is built without arguments."""
    text = BASE + '\n[metric]\nglobal = "engine.metrics:ExactMatch"\n'
    assert callable(load_run_file(_write(tmp_path, text)).build_global_metric())
    text = BASE + '\n[metric]\nglobal = "engine.metrics:nope"\n'
    with pytest.raises(ConfigError, match=r"\[metric\].global: 'engine.metrics' has no attribute"):
        load_run_file(_write(tmp_path, text)).build_global_metric()


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    """Issue 18: a run file saved with a UTF-8 BOM said "Invalid statement"."""
    path = _write(tmp_path, BASE)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_run_file(path).prompt.model == "demo"


def test_a_copied_run_file_says_paths_are_relative_to_its_folder(tmp_path: Path) -> None:
    """Issue 19: the README's "copy examples/demo.toml" found no prompt.json and said
    only that; the error names the line, the rule and the fix."""
    copy = tmp_path / "demo.toml"
    copy.write_text((ROOT / "examples" / "demo.toml").read_text())
    with pytest.raises(ConfigError) as info:
        load_run_file(copy)
    message = str(info.value)
    assert message.startswith(f"{copy}:") and "[prompt] file" in message
    assert f"paths are relative to the run file's folder: {tmp_path}/" in message
    assert "copy the run file together with its folder" in message
    (tmp_path / "prompt.json").write_text((ROOT / "examples" / "prompt.json").read_text())
    with pytest.raises(ConfigError, match=r"demo.toml:\d+: \[data\] train: no such file"):
        load_run_file(copy)


def test_the_bundled_folder_works_wherever_it_is_copied(tmp_path: Path) -> None:
    """What the README says: copy the folder, and the run file finds its files."""
    import shutil

    shutil.copytree(ROOT / "examples", tmp_path / "my_run")
    run = load_run_file(tmp_path / "my_run" / "demo.toml")
    assert len(run.train) == 40 and run.output_dir == tmp_path / "out" / "demo"


ENDPOINTS = """\
[model]
adapter = "adapters.openai_chat:OpenAIChat"
api_key_env = "TASK_KEY"
options = { base_url = "http://127.0.0.1:8000/v1", timeout = 5 }

[optimizer]
adapter = "adapters.openai_chat:OpenAIChat"
model_name = "gpt-4o"
"""


def test_an_optimizer_without_an_endpoint_uses_the_models(tmp_path: Path) -> None:
    """Issue 19: an [optimizer] with no base_url silently called api.openai.com."""
    text = BASE.split("[model]")[0] + ENDPOINTS
    run = load_run_file(_write(tmp_path, text))
    assert run.optimizer is not None
    assert run.optimizer.options["base_url"] == "http://127.0.0.1:8000/v1"
    assert run.optimizer.api_key_env == "TASK_KEY" and run.optimizer.model_name == "gpt-4o"
    own = text + 'options = { base_url = "http://127.0.0.1:9000/v1" }\napi_key_env = "OPT_KEY"\n'
    run = load_run_file(_write(tmp_path, own))
    assert run.optimizer is not None
    assert run.optimizer.options == {"base_url": "http://127.0.0.1:9000/v1"}
    assert run.optimizer.api_key_env == "OPT_KEY"


async def test_selection_keys_reach_optimize(tmp_path: Path) -> None:
    """[trainer] selection, accept_on, tie_break, patience, merge: parsed, checked, and
    taken by optimize as given (a TOML list for tie_break)."""
    from adapters import ArithmeticCoach, ArithmeticModel
    from engine import optimize

    text = BASE.replace(
        'train = "train.jsonl"', 'train = "train.jsonl"\nval = "val.jsonl"\ninputs = "question"'
    )
    text += (
        '\n[trainer]\nselection = "pareto"\naccept_on = "val"\n'
        'tie_break = ["cost", "length"]\npatience = 3\nmerge = true\n'
        'task_description = "add"\nmetric_description = "exact"\n'
    )
    run = load_run_file(_write(tmp_path, text))
    assert {k: run.trainer[k] for k in ("selection", "tie_break", "patience", "merge")} == {
        "selection": "pareto",
        "tie_break": ["cost", "length"],
        "patience": 3,
        "merge": True,
    }
    result = await optimize(
        run.prompt,
        run.train,
        valset=run.val,
        metric=run.build_metric(),
        model=ArithmeticModel(),
        optimizer_model=ArithmeticCoach(),
        **run.trainer,
    )
    assert result.report.settings["selection"] == "pareto"
    assert result.report.settings["tie_break"] == ["cost", "length"]
    bad = _error(tmp_path, BASE + '\n[trainer]\nselection = "best"\n')
    assert "[trainer] selection" in bad


def test_an_anthropic_endpoint_with_input_and_output_limits_loads_and_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21: the two-line change to Claude, ITPM and OTPM as limits."""
    text = BASE.replace(
        'adapter = "adapters.scripted:ArithmeticModel"',
        'adapter = "adapters.anthropic:AnthropicChat"\n'
        'api_key_env = "ANTHROPIC_API_KEY"\n'
        "limits = { rpm = 4000, input_tpm = 2000000, output_tpm = 400000 }",
    )
    run = load_run_file(_write(tmp_path, text))
    assert run.model.limits == Limits(rpm=4000, input_tpm=2_000_000, output_tpm=400_000)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-runfile-test-0000000000")
    chat = run.model.build()
    assert type(chat).__name__ == "AnthropicChat" and chat.limits == run.model.limits


def test_a_run_files_own_modules_are_found_from_any_directory(tmp_path: Path) -> None:
    """A project's run file names its metric as ``mycode.scoring:first_word``; the
    command ran only from the project's root (``No module named 'mycode'`` elsewhere,
    as `examples/program/run.toml` did).  Now the module is looked up from the run
    file's folder up, in the CLI's process and its workers alike."""
    from .support import run_cli

    project = tmp_path / "project"
    (project / "mycode").mkdir(parents=True)
    (project / "mycode" / "scoring.py").write_text(
        "def first_word(example, prediction):\n"
        "    return float(prediction.split()[0] == example.expected)\n"
    )
    (project / "runs").mkdir()
    run = _write(
        project / "runs",
        """
[prompt]
messages = [{ role = "user", content = "{question}" }]
model = "demo"
[data]
train = "train.jsonl"
inputs = ["question"]
expected = "answer"
[metric]
use = "mycode.scoring:first_word"
[model]
adapter = "adapters.scripted:ArithmeticModel"
[output]
dir = "out"
""",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_cli("evaluate", str(run), "--quiet", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["completed"] == 4


def test_a_module_that_imports_is_never_shadowed_by_the_run_files_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder beside the run file holding ``json.py`` does not replace the standard
    library's ``json``; a module found nowhere changes nothing (Python's own error)."""
    from engine.cli._imports import import_root

    monkeypatch.setattr(sys, "path", list(sys.path))
    # setenv, not delenv: delenv of an unset variable records nothing to restore, and
    # the folder added below (its json.py!) would stay on every later subprocess's path
    monkeypatch.setenv("PYTHONPATH", "")
    (tmp_path / "json.py").write_text("raise SystemExit('shadowed')\n")
    before = list(sys.path)
    assert import_root("json", tmp_path) is None
    assert import_root("no_such_module_anywhere.sub", tmp_path) is None
    assert sys.path == before and os.environ["PYTHONPATH"] == ""
    (tmp_path / "pkg" / "deep").mkdir(parents=True)
    (tmp_path / "pkg" / "deep" / "mod.py").write_text("VALUE = 7\n")
    assert import_root("pkg.deep.mod", tmp_path / "pkg" / "deep") == tmp_path.resolve()
    assert sys.path[0] == str(tmp_path.resolve())
    assert os.environ["PYTHONPATH"] == str(tmp_path.resolve())
