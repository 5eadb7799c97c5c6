"""What a CLI command checks before its first call, for real runs and ``--dry-run`` alike.

`prepare` resolves every adapter, checks every dataset row against the placeholders of
the prompt that will run (`validate_examples`, the error naming ``file:line``), builds the
metric and the global metric, checks money-budget prices, and validates every output path
(`engine.cli._outputs`).  Anything wrong is a `ConfigError` (exit 2) while nothing has been
opened, created or paid for.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from .._budget import BudgetMeter
from .._errors import ConfigError
from .._evaluate import validate_examples
from .._prompt import Prompt
from .._types import Example
from ..cluster import FileDataset
from ..data import row_location
from ._outputs import check_output_dir, check_output_file
from ._runfile import RunFile, endpoint_url, resolve
from ._schema_check import TomlSource

__all__ = ["OPTIMIZE_FILES", "Job", "dry_run_endpoints", "prepare", "source_line"]

OPTIMIZE_FILES = ("best_prompt.json", "report.json", "report.md", "report.html", "scores.png")
_ROW = re.compile(r"example #(\d+)")


@dataclass(frozen=True, slots=True)
class Job:
    """One checked command: the prompt that runs, the examples it scores and where its
    output goes (a folder for ``optimize``, a JSONL file for ``evaluate``).

    ``data`` is a list, or a `FileDataset` when a cluster streams the file (its rows
    are checked by the cluster, before its first call)."""

    command: Literal["optimize", "evaluate"]
    prompt: Prompt
    data: list[Example] | FileDataset
    out: Path
    out_option: str  # how the user named ``out``, for messages
    prompts: Mapping[str, Prompt] | None = None  # a program's prompts (``prompt``: the first)


def _check_rows(
    prompt: Prompt | Mapping[str, Prompt], examples: list[Example], path: Path | None, split: str
) -> None:
    try:
        validate_examples(prompt, examples)
    except ConfigError as exc:
        row = _ROW.search(exc.message)
        where = row_location(path, int(row.group(1))) if row and path else None
        raise ConfigError(
            f"{where or path}: [data] {split}: {exc.message}{_columns_hint(exc.message, examples)}"
        ) from None


def _columns_hint(message: str, examples: list[Example]) -> str:
    """What the rows do have, and the fix, when a placeholder finds no column."""
    if "placeholder" not in message or not examples:
        return ""
    row = _ROW.search(message)
    example = examples[int(row.group(1))] if row else examples[0]
    have = ", ".join(sorted(example.inputs))
    return (
        f"; the rows have: {have}; rename the column or the {{placeholder}}, or map the "
        "columns with [data] inputs"
    )


def _check_endpoints(run: RunFile, command: str) -> None:
    if command == "optimize" and run.optimizer is None:
        raise ConfigError(f"{run.path}: [optimizer] is required for optimize")
    for name, spec in (("model", run.model), ("optimizer", run.optimizer), ("batch", run.batch)):
        if spec is not None:
            resolve(spec.adapter, f"{source_line(run, [name, 'adapter'])}: [{name}] adapter")
    for name, spec in run.adapters.items():
        where = source_line(run, ["adapters", name, "adapter"])
        resolve(spec.adapter, f"{where}: [adapters.{name}] adapter")
    models = [p.model for p in (run.prompts or {"": run.prompt}).values()]
    if run.optimizer is not None and run.optimizer.model_name:
        models.append(run.optimizer.model_name)
    try:
        BudgetMeter(run.budget, models)  # a money budget without prices fails here
    except ConfigError as exc:
        raise ConfigError(f"{run.path}: [budget] {exc.message}") from None


def _check_keys(run: RunFile) -> None:
    # before anything is created or opened: EndpointSpec.build() would fail later anyway
    for name, spec in (("model", run.model), ("optimizer", run.optimizer), ("batch", run.batch)):
        if spec is not None and spec.api_key_env and not os.environ.get(spec.api_key_env):
            # an [optimizer] that names no key of its own uses [model]'s: point there
            own = "api_key_env" in (run.raw.get(name) or {})
            section = name if own else "model"
            raise ConfigError(
                f"{source_line(run, [section, 'api_key_env'])}: [{section}] api_key_env: "
                f"environment variable {spec.api_key_env} is not set; fix: "
                f"export {spec.api_key_env}=<your key> in the shell that runs this "
                "(the key never goes in the run file)"
            )


def _outputs(
    run: RunFile, command: str, out: str | None, split: str, inputs: dict[Path, str]
) -> tuple[Path, str]:
    option = "--out" if out else "[output] dir"
    if command == "optimize":
        folder = check_output_dir(
            Path(out) if out else run.output_dir, inputs=inputs, option=option
        )
        for name in OPTIMIZE_FILES:
            check_output_file(folder / name, inputs=inputs, option=option)
        return folder, option
    path = Path(out) if out else run.output_dir / f"evaluation_{split}.jsonl"
    return check_output_file(path, inputs=inputs, option=option), option


def prepare(
    run: RunFile,
    command: Literal["optimize", "evaluate"],
    *,
    out: str | None = None,
    split: str = "train",
    prompt: Prompt | None = None,
    prompt_path: str | None = None,
    check_keys: bool = True,
) -> Job:
    """Check everything ``command`` needs before its first call; raise `ConfigError`.

    ``prompt`` (read from ``prompt_path``) replaces the run file's prompt for
    ``evaluate``; ``split`` picks the dataset it scores.  ``check_keys`` requires every
    ``api_key_env`` variable to be set (a dry run may plan without the keys).
    """
    _check_endpoints(run, command)
    if check_keys:
        _check_keys(run)
    if run.prompts is not None:
        return _program_job(run, command, out, split, prompt_path)
    used = prompt or run.prompt
    if not run.data_loaded:
        return _streamed(run, command, used, out, split, prompt_path)
    splits = {"train": (run.train, run.train_path), "val": (run.val, run.val_path)}
    if command == "evaluate" and splits[split][0] is None:
        raise ConfigError(f"{run.path}: no [data] val to evaluate")
    for name in ("train", "val") if command == "optimize" else (split,):
        rows, path = splits[name]
        if rows is not None:
            _check_rows(used, rows, path, name)
    target, option = _checked_outputs(run, command, out, split, prompt_path)
    data = splits[split if command == "evaluate" else "train"][0]
    assert data is not None
    return Job(command=command, prompt=used, data=data, out=target, out_option=option)


def _program_job(
    run: RunFile,
    command: Literal["optimize", "evaluate"],
    out: str | None,
    split: str,
    prompt_path: str | None,
) -> Job:
    """`prepare` for a run file with a ``[program]``: its prompts, the program
    importable, and what programs do not do yet refused before anything is opened."""
    assert run.prompts is not None
    for what, given in (
        ("--prompt", prompt_path is not None),
        ("[batch]", run.batch is not None),
        ("[cluster]", run.cluster is not None or not run.data_loaded),
    ):
        if given:
            raise ConfigError(f"{run.path}: {what} does not apply to a [program] run (yet)")
    run.build_program()
    splits = {"train": (run.train, run.train_path), "val": (run.val, run.val_path)}
    if command == "evaluate" and splits[split][0] is None:
        raise ConfigError(f"{run.path}: no [data] val to evaluate")
    for name in ("train", "val") if command == "optimize" else (split,):
        rows, path = splits[name]
        if rows is not None:
            _check_rows(run.prompts, rows, path, name)
    target, option = _checked_outputs(run, command, out, split, prompt_path)
    data = splits[split if command == "evaluate" else "train"][0]
    assert data is not None
    return Job(command, run.prompt, data, target, option, prompts=run.prompts)


def _checked_outputs(
    run: RunFile,
    command: Literal["optimize", "evaluate"],
    out: str | None,
    split: str,
    prompt_path: str | None,
) -> tuple[Path, str]:
    """Build the metrics (a broken one fails here) and check the output paths against
    every input, the --prompt file included; the target and the option naming it."""
    run.build_metric()
    run.build_global_metric()
    inputs = run.input_paths
    if prompt_path is not None:
        inputs[Path(os.path.abspath(prompt_path))] = "the --prompt file"
    return _outputs(run, command, out, split, inputs)


def _streamed(
    run: RunFile,
    command: Literal["optimize", "evaluate"],
    prompt: Prompt,
    out: str | None,
    split: str,
    prompt_path: str | None,
) -> Job:
    """`prepare` for an evaluation whose file a cluster reads (``load_data=False``)."""
    path = run.train_path if split == "train" else run.val_path
    if command != "evaluate" or path is None:
        raise ConfigError(f"{run.path}: no [data] {split} to evaluate")
    target, option = _checked_outputs(run, command, out, split, prompt_path)
    data = FileDataset(path, run.columns)
    return Job(command=command, prompt=prompt, data=data, out=target, out_option=option)


def source_line(run: RunFile, keys: list[str]) -> str:
    """``file:line`` of ``keys`` in the run file (the file alone if it cannot tell)."""
    try:
        text = run.path.read_text(encoding="utf-8-sig")
    except OSError:
        return str(run.path)
    return TomlSource(run.path, text).where(keys)


def dry_run_endpoints(run: RunFile) -> dict[str, str]:
    """Where each endpoint section sends its calls, as the run will (an ``[optimizer]``
    without an endpoint uses ``[model]``'s); a host that does not resolve is a
    `ConfigError` naming where the URL is configured."""
    shown: dict[str, str] = {}
    for name, spec in (("model", run.model), ("optimizer", run.optimizer), ("batch", run.batch)):
        if spec is None:
            continue
        url = endpoint_url(spec)
        if url is None:
            shown[name] = f"{spec.adapter} (no base_url: in process, or the adapter's default)"
            continue
        key = "base_url" if "base_url" in spec.options else "azure_endpoint"
        own = key in (run.raw.get(name, {}).get("options") or {})
        where = source_line(run, [name if own else "model", "options"])
        host = urlsplit(url).hostname
        try:
            socket.getaddrinfo(host, None)
        except (OSError, UnicodeError):
            raise ConfigError(
                f"{where}: [{name if own else 'model'}] options.{key}: host {host!r} of {url} "
                "does not resolve; fix the URL (or the network)"
            ) from None
        shown[name] = url + ("" if own else " (inherited from [model])")
    return shown
