"""Run files (TOML): what to optimize or evaluate, on which endpoints, with which limits.

Adapters and metrics are named as ``"module:attr"`` strings and resolved at run time,
so the engine never imports ``adapters``.  Secrets never live in a run file: an
endpoint names the environment variable that holds its key (``api_key_env``).
Paths are relative to the run file.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._budget import Budget, Price
from ._errors import ConfigError
from ._limits import Limits
from ._pg_schema import check_table, check_url
from ._prompt import Prompt
from ._retry import RetryPolicy
from ._types import Example
from .data import ColumnMap, load_dataset

__all__ = ["EndpointSpec", "RunFile", "load_run_file", "resolve"]

_SECRET_KEYS = {"api_key", "apikey", "key", "token", "secret", "password", "authorization"}


def resolve(spec: str, where: str) -> Any:
    """Import ``"package.module:attr"``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"{where}: expected 'module:attribute', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import {module_name!r}: {exc}") from exc
    try:
        value = module
        for part in attr.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}") from None
    return value


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return value


def _typed(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: {key} must be {names}, got {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class EndpointSpec:
    """An endpoint section: the adapter, its options, limits, retry and model name."""

    adapter: str
    options: Mapping[str, Any]
    limits: Limits | None
    retry: RetryPolicy | None
    model_name: str | None
    api_key_env: str | None

    def build(self) -> Any:
        cls = resolve(self.adapter, "adapter")
        options = dict(self.options)
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(f"environment variable {self.api_key_env} is not set")
            options["api_key"] = key
        accepted = inspect.signature(cls).parameters
        if self.limits is not None and "limits" in accepted:
            options["limits"] = self.limits
        try:
            return cls(**options)
        except TypeError as exc:
            raise ConfigError(f"adapter {self.adapter}: bad options: {exc}") from exc


def _endpoint(data: Mapping[str, Any], key: str, where: str) -> EndpointSpec | None:
    if key not in data:
        return None
    table = _table(data, key, where)
    adapter = table.get("adapter")
    if not isinstance(adapter, str):
        raise ConfigError(f"{where}: [{key}] needs adapter = 'module:Class'")
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: [{key}].options must be a table")
    leaked = sorted(k for k in options if k.lower().replace("-", "_") in _SECRET_KEYS)
    if leaked:
        raise ConfigError(
            f"{where}: [{key}].options holds secret field(s) {leaked}; secrets come from the "
            "environment: set api_key_env = 'NAME_OF_VARIABLE'"
        )
    limits = None
    if "limits" in table:
        lt = _table(table, "limits", f"{where} [{key}]")
        unknown = set(lt) - {"rpm", "tpm", "concurrency", "burst"}
        if unknown:
            raise ConfigError(f"{where}: [{key}.limits] unknown key(s) {sorted(unknown)}")
        limits = Limits(
            rpm=_typed(lt, "rpm", (int, float), f"{where} [{key}.limits]"),
            tpm=_typed(lt, "tpm", (int, float), f"{where} [{key}.limits]"),
            concurrency=_typed(lt, "concurrency", int, f"{where} [{key}.limits]") or 32,
            burst=_typed(lt, "burst", (int, float), f"{where} [{key}.limits]"),
        )
    retry = None
    if "retry" in table:
        rt = _table(table, "retry", f"{where} [{key}]")
        try:
            retry = RetryPolicy(**rt)
        except TypeError as exc:
            raise ConfigError(f"{where}: [{key}.retry]: {exc}") from exc
    return EndpointSpec(
        adapter=adapter,
        options=options,
        limits=limits,
        retry=retry,
        model_name=_typed(table, "model_name", str, f"{where} [{key}]"),
        api_key_env=_typed(table, "api_key_env", str, f"{where} [{key}]"),
    )


@dataclass(frozen=True)
class RunFile:
    """A parsed run file: everything needed before the first call."""

    path: Path
    prompt: Prompt
    train: list[Example]
    val: list[Example] | None
    metric_spec: str
    metric_options: Mapping[str, Any]
    model: EndpointSpec
    optimizer: EndpointSpec | None
    batch: EndpointSpec | None
    trainer: Mapping[str, Any]
    budget: Budget | None
    cache_path: Path | None
    cache_flush_interval: float
    output_dir: Path
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)
    cache_url: str | None = None  # a postgresql:// URL: the cache shared across workers
    cache_table: str = "engine_cache"  # its table there

    def build_metric(self) -> Any:
        target = resolve(self.metric_spec, "[metric].use")
        if inspect.isclass(target):
            try:
                return target(**self.metric_options)
            except TypeError as exc:
                raise ConfigError(f"[metric]: bad options for {self.metric_spec}: {exc}") from exc
        if self.metric_options:
            raise ConfigError("[metric].options only apply to a metric class")
        if not callable(target):
            raise ConfigError(f"[metric].use {self.metric_spec} is not callable")
        return target


_TRAINER_KEYS = {
    "batch_size": int,
    "max_proposals_per_step": int,
    "history_size": int,
    "seed": int,
    "racing": bool,
    "parallel_proposals": int,
    "task_description": str,
    "metric_description": str,
}


def load_run_file(path: str | os.PathLike[str]) -> RunFile:
    """Parse and validate a run file, loading its datasets; raises `ConfigError`."""
    p = Path(path)
    where = str(p)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such run file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read the run file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    base = p.parent

    pt = _table(data, "prompt", where)
    if "file" in pt:
        prompt_path = base / str(pt["file"])
        try:
            prompt_data = json.loads(prompt_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: [prompt].file {prompt_path}: {exc}") from None
        messages = prompt_data.get("messages") if isinstance(prompt_data, dict) else prompt_data
    else:
        messages = pt.get("messages")
    if not isinstance(messages, list):
        raise ConfigError(f"{where}: [prompt] needs messages (inline or in a JSON file)")
    model_name = pt.get("model")
    if not isinstance(model_name, str):
        raise ConfigError(f"{where}: [prompt].model must be a string")
    params = pt.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: [prompt].params must be a table")
    prompt = Prompt(
        messages,
        model=model_name,
        temperature=_typed(pt, "temperature", (int, float), f"{where} [prompt]"),
        params=params,
        response_format=pt.get("response_format"),
    )

    dt = _table(data, "data", where)
    columns = ColumnMap(
        inputs=dt.get("inputs"),
        expected=dt.get("expected", "expected"),
        id=dt.get("id", "id"),
    )
    if "train" not in dt:
        raise ConfigError(f"{where}: [data].train is required")
    train = load_dataset(base / str(dt["train"]), columns)
    val = load_dataset(base / str(dt["val"]), columns) if dt.get("val") else None

    mt = _table(data, "metric", where)
    metric_spec = mt.get("use", "engine.metrics:ExactMatch")
    metric_options = mt.get("options", {})

    model = _endpoint(data, "model", where)
    if model is None:
        raise ConfigError(f"{where}: [model] (the task endpoint) is required")
    optimizer = _endpoint(data, "optimizer", where)
    batch = _endpoint(data, "batch", where)  # optional bulk path for `evaluate`

    tt = _table(data, "trainer", where)
    trainer: dict[str, Any] = {}
    for key in tt:
        kind = _TRAINER_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where}: [trainer] unknown key {key!r}")
        trainer[key] = _typed(tt, key, kind, f"{where} [trainer]")

    budget = None
    if "budget" in data:
        bt = _table(data, "budget", where)
        prices = {
            name: Price(float(v[0]), float(v[1]))
            for name, v in _table(bt, "prices", f"{where} [budget]").items()
        }
        budget = Budget(
            max_calls=_typed(bt, "max_calls", int, f"{where} [budget]"),
            max_tokens=_typed(bt, "max_tokens", int, f"{where} [budget]"),
            max_cost=_typed(bt, "max_cost", (int, float), f"{where} [budget]"),
            prices=prices,
        )

    cache = _cache_section(_table(data, "cache", where), base, where)
    ot = _table(data, "output", where)
    output_dir = (base / str(ot.get("dir", "out"))).resolve()
    return RunFile(
        path=p,
        prompt=prompt,
        train=train,
        val=val,
        metric_spec=metric_spec,
        metric_options=metric_options,
        model=model,
        optimizer=optimizer,
        batch=batch,
        trainer=trainer,
        budget=budget,
        output_dir=output_dir,
        raw=data,
        **cache,
    )


def _cache_section(ct: Mapping[str, Any], base: Path, where: str) -> dict[str, Any]:
    """``[cache]``: a SQLite ``path``, or a PostgreSQL ``url`` (and ``table``) shared by
    workers, whose password belongs in PGPASSWORD rather than in the file."""
    cache_path = (base / str(ct["path"])).resolve() if ct.get("path") else None
    url = _typed(ct, "url", str, f"{where} [cache]")
    table = _typed(ct, "table", str, f"{where} [cache]") or "engine_cache"
    if url is not None and cache_path is not None:
        raise ConfigError(f"{where}: [cache] takes a path (SQLite) or a url (PostgreSQL), not both")
    try:
        if url is not None:
            check_url(url)
        check_table(table)
    except ConfigError as exc:
        raise ConfigError(f"{where}: [cache]: {exc}") from None
    flush = _typed(ct, "flush_interval", (int, float), f"{where} [cache]")
    if flush is not None and not 0 < flush <= 5:
        raise ConfigError(f"{where}: [cache].flush_interval must be in (0, 5] seconds")
    return {
        "cache_path": cache_path,
        "cache_flush_interval": float(flush) if flush is not None else 0.2,
        "cache_url": url,
        "cache_table": table,
    }
