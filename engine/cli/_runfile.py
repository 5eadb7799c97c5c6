"""Run files (TOML): what to optimize or evaluate, on which endpoints, with which limits.

The file is checked against a declared schema (`engine.cli._schema`): unknown keys, wrong
types, out-of-range values and secrets are `ConfigError`s naming file, line, section and
key, raised before any dataset is read or any call is made.  Adapters and metrics are
named as ``"module:attr"`` strings and resolved at run time, so the engine never imports
``adapters``; a module Python cannot find is looked up from the run file's folder up
(`engine.cli._imports`).  Secrets never live in a run file: an endpoint names the environment
variable that holds its key (``api_key_env``).  Paths are relative to the run file.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
import pkgutil
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from .._budget import Budget, Price
from .._errors import ConfigError, DataError
from .._prompt import Prompt
from .._redact import register_secret
from .._types import Example
from ..cache import check_table, check_url
from ..data import ColumnMap, load_splits
from ..endpoint import Limits, RetryPolicy
from ._imports import import_root
from ._schema import (
    BudgetSection,
    CacheSection,
    ClusterSection,
    EndpointSection,
    MetricSection,
    PromptSection,
    RetrySection,
    RunFileSchema,
)
from ._schema_check import TomlSource, decode_run_file

__all__ = [
    "ClusterSpec",
    "EndpointSpec",
    "RunFile",
    "endpoint_url",
    "inherit_endpoint",
    "load_run_file",
    "resolve",
]

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_RAY_ADDRESS = re.compile(r"^ray://[^\s:/]+:\d{1,5}$")


def resolve(spec: str, where: str) -> Any:
    """Import ``"package.module:attr"``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"{where}: expected 'module:attribute', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _did_you_mean(module_name)
        raise ConfigError(f"{where}: cannot import {module_name!r}: {exc}{hint}") from exc
    try:
        value = module
        for part in attr.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}") from None
    return value


def _did_you_mean(module_name: str) -> str:
    """``; did you mean 'pkg.close_module:Class'?`` for a module that does not exist
    beside ones that do (the package's modules, their public classes)."""
    package, _, leaf = module_name.rpartition(".")
    try:
        found = importlib.import_module(package) if package else None
    except ImportError:
        return ""
    paths = getattr(found, "__path__", None)
    if not paths:
        return ""
    names = [m.name for m in pkgutil.iter_modules(paths) if not m.name.startswith("_")]
    close = difflib.get_close_matches(leaf, names, n=3, cutoff=0.4)
    close += [n for n in names if n.startswith(leaf) and n not in close]
    offers = []
    for name in close[:3]:
        full = f"{package}.{name}"
        try:
            candidate = importlib.import_module(full)
        except ImportError:
            continue
        classes = [
            attr
            for attr, value in vars(candidate).items()
            if inspect.isclass(value) and value.__module__ == full and not attr.startswith("_")
        ]
        offers += [f"{full}:{attr}" for attr in classes[:2]] or [full]
    return f"; did you mean {' or '.join(repr(o) for o in offers)}?" if offers else ""


@dataclass(frozen=True)
class EndpointSpec:
    """An endpoint section: the adapter, its options, limits, retry and model name."""

    adapter: str
    options: Mapping[str, Any]
    limits: Limits | None
    retry: RetryPolicy | None
    model_name: str | None
    api_key_env: str | None
    cache_namespace: str | None = None

    def build(self) -> Any:
        """Instantiate the adapter with its options, key and limits."""
        cls = resolve(self.adapter, "adapter")
        options = dict(self.options)
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(f"environment variable {self.api_key_env} is not set")
            register_secret(key)  # redacted by value from now on, whatever its shape
            options["api_key"] = key
        accepted = inspect.signature(cls).parameters
        if self.limits is not None and "limits" in accepted:
            options["limits"] = self.limits
        try:
            return cls(**options)
        except TypeError as exc:
            raise ConfigError(f"adapter {self.adapter}: bad options: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """``[cluster]``: ``address`` is ``"local"``, ``"auto"`` or ``"ray://host:port"``;
    ``workers`` is the number of evaluation workers, ``None`` to let the cluster decide."""

    address: str = "local"
    workers: int | None = None


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
    global_metric_spec: str | None = None
    metric_timeout: float = 60.0
    metric_threads: int | None = None
    cache_url: str | None = None
    cluster: ClusterSpec | None = None
    train_path: Path | None = None
    val_path: Path | None = None
    prompt_file: Path | None = None
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)
    cache_table: str = "engine_cache"  # the table of a PostgreSQL cache
    columns: ColumnMap = field(default_factory=ColumnMap)  # how [data] rows map to examples
    data_loaded: bool = True  # False: train/val are empty, read where the work runs
    # a program: [program] use, its [prompts.NAME] (``prompt`` is the first), the
    # endpoint section each runs on (absent: [model]), [adapters.NAME], its calls bound
    program_spec: str | None = None
    prompts: Mapping[str, Prompt] | None = None
    prompt_adapters: Mapping[str, str] = field(default_factory=dict)
    adapters: Mapping[str, EndpointSpec] = field(default_factory=dict)
    calls_per_example: Mapping[str, int] = field(default_factory=dict)

    def build_program(self) -> Any:
        """Resolve ``[program] use`` (an async callable ``(lm, example) -> answer``)."""
        assert self.program_spec is not None
        target = resolve(self.program_spec, "[program].use")
        if not callable(target):
            raise ConfigError(f"[program].use {self.program_spec} is not callable")
        return target

    @property
    def input_paths(self) -> dict[Path, str]:
        """Every file this run reads, with what it is: outputs must not overwrite them."""
        named = {
            self.path: "the run file",
            self.train_path: "the [data] train dataset",
            self.val_path: "the [data] val dataset",
            self.prompt_file: "the [prompt] file",
            self.cache_path: "the [cache] file",
        }
        return {p: what for p, what in named.items() if p is not None}

    def build_metric(self) -> Any:
        """Resolve ``[metric] use`` and instantiate it with ``[metric] options``."""
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

    def build_global_metric(self) -> Any:
        """Resolve ``[metric] global`` (a callable over the list of `MetricResult`s; a
        class is instantiated without arguments).  ``None`` when not given: the engine's
        default, the mean, under which racing stays exact."""
        if self.global_metric_spec is None:
            return None
        target = resolve(self.global_metric_spec, "[metric].global")
        if inspect.isclass(target):
            try:
                target = target()
            except TypeError as exc:
                raise ConfigError(
                    f"[metric].global {self.global_metric_spec}: a class must take no "
                    f"arguments: {exc}"
                ) from exc
        if not callable(target):
            raise ConfigError(f"[metric].global {self.global_metric_spec} is not callable")
        return target


# -- from the schema to the engine's values ------------------------------------------
def _read(path: Path) -> tuple[TomlSource, dict[str, Any]]:
    where = str(path)
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not TOML's business
        text = path.read_text(encoding="utf-8-sig")
        return TomlSource(path, text), tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such run file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a folder, not a run file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read the run file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None


def _fail(source: TomlSource, keys: list[str], message: str) -> ConfigError:
    return ConfigError(f"{source.where(keys)}: {message}")


def _messages(section: PromptSection, base: Path, source: TomlSource) -> tuple[Any, Path | None]:
    if section.file is not None and section.messages is not None:
        raise _fail(source, ["prompt", "file"], "[prompt] has both file and messages; keep one")
    if section.file is None:
        if section.messages is None:
            raise _fail(source, ["prompt"], "[prompt] needs messages (inline or in a JSON file)")
        return section.messages, None
    prompt_path = base / section.file
    if not prompt_path.is_file():
        raise _fail(source, ["prompt", "file"], f"[prompt] file: {_no_such(prompt_path, base)}")
    try:
        data = json.loads(prompt_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(source, ["prompt", "file"], f"[prompt] file {prompt_path}: {exc}") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise _fail(source, ["prompt", "file"], f"{prompt_path}: no list of messages")
    return messages, prompt_path


def _prompt(section: PromptSection, base: Path, source: TomlSource) -> tuple[Prompt, Path | None]:
    messages, prompt_path = _messages(section, base, source)
    try:
        prompt = Prompt(
            messages,
            model=section.model,
            temperature=section.temperature,
            params=section.params,
            response_format=section.response_format,
        )
    except ConfigError as exc:
        raise _fail(source, ["prompt"], f"[prompt]: {exc.message}") from None
    return prompt, prompt_path


def _prompts(
    schema: RunFileSchema, base: Path, source: TomlSource
) -> tuple[Prompt, Path | None, dict[str, Any]]:
    """``[prompt]``, or a ``[program]`` with its ``[prompts.NAME]``: the prompt (a
    program's first), its file, and the program's `RunFile` fields."""
    if schema.prompts is None and schema.program is None:
        if schema.prompt is None:
            raise _fail(source, [], "the run file needs [prompt] (or [program] and [prompts.NAME])")
        return (*_prompt(schema.prompt, base, source), {})
    if schema.prompt is not None or schema.program is None or not schema.prompts:
        raise _fail(
            source, ["program"], "a program needs [program] use and [prompts.NAME] tables, "
            "and no [prompt]",
        )  # fmt: skip
    if not _SPEC.match(schema.program.use):
        raise _fail(source, ["program", "use"], "[program] use must be 'module:callable'")
    prompts = {name: _prompt(section, base, source)[0] for name, section in schema.prompts.items()}
    adapters: dict[str, EndpointSpec] = {}
    for name, section in schema.adapters.items():
        spec = _endpoint(section, f"adapters.{name}", source)
        assert spec is not None
        adapters[name] = spec
    placed = {n: s.adapter for n, s in schema.prompts.items() if s.adapter not in (None, "model")}
    for name, table in placed.items():
        if table not in adapters:
            raise _fail(
                source, ["prompts", name, "adapter"],
                f"[prompts.{name}] adapter {table!r}: no [adapters.{table}] table",
            )  # fmt: skip
    declared = schema.program.calls_per_example
    unknown = sorted(set(declared) - set(prompts)) if isinstance(declared, dict) else []
    if unknown:
        raise _fail(
            source, ["program", "calls_per_example"],
            f"[program] calls_per_example names no prompt: {unknown}",
        )  # fmt: skip
    calls = (
        dict.fromkeys(prompts, declared) if isinstance(declared, int)
        else {**dict.fromkeys(prompts, 1), **(declared or {})}
    )  # fmt: skip
    fields = {
        "program_spec": schema.program.use, "prompts": prompts, "prompt_adapters": placed,
        "adapters": adapters, "calls_per_example": calls,
    }  # fmt: skip
    return next(iter(prompts.values())), None, fields


def _retry(section: RetrySection | None, source: TomlSource, name: str) -> RetryPolicy | None:
    if section is None:
        return None
    given: dict[str, Any] = {}
    for key, value in msgspec.structs.asdict(section).items():
        if value is True:
            raise _fail(
                source,
                [name, "retry", key],
                f"[{name}.retry] {key} = true means nothing; give a number, or false for none",
            )
        if value is not None:
            given[key] = None if value is False else value
    hedge_after = given.get("hedge_after")
    if isinstance(hedge_after, str | float) and not (
        hedge_after == "p95" or (isinstance(hedge_after, float) and math.isfinite(hedge_after))
    ):
        raise _fail(
            source,
            [name, "retry", "hedge_after"],
            f'[{name}.retry] hedge_after must be finite seconds > 0 or "p95" (the observed '
            f"p95 latency), got {json.dumps(hedge_after)}",
        )
    return RetryPolicy(**given)


def _limits(section: EndpointSection) -> Limits | None:
    if section.limits is None:
        return None
    given = {k: v for k, v in msgspec.structs.asdict(section.limits).items() if v is not None}
    return Limits(**given)


def _endpoint(
    section: EndpointSection | None, name: str, source: TomlSource
) -> EndpointSpec | None:
    if section is None:
        return None
    if not _SPEC.match(section.adapter):
        raise _fail(
            source,
            [name, "adapter"],
            f"[{name}] adapter must be 'module:Class', got {section.adapter!r}",
        )
    return EndpointSpec(
        adapter=section.adapter,
        options=section.options,
        limits=_limits(section),
        retry=_retry(section.retry, source, name),
        model_name=section.model_name,
        api_key_env=section.api_key_env,
        cache_namespace=section.cache_namespace,
    )


_ENDPOINT_OPTIONS = ("base_url", "azure_endpoint")


def inherit_endpoint(spec: EndpointSpec | None, model: EndpointSpec) -> EndpointSpec | None:
    """An ``[optimizer]`` on ``[model]``'s adapter that names no endpoint of its own
    talks to ``[model]``'s (its options and key under its own), never to the adapter's
    default host behind the user's back."""
    if spec is None or spec.adapter != model.adapter:
        return spec
    if any(key in spec.options for key in _ENDPOINT_OPTIONS):
        return spec
    return replace(
        spec,
        options={**model.options, **spec.options},
        api_key_env=spec.api_key_env or model.api_key_env,
    )


def endpoint_url(spec: EndpointSpec) -> str | None:
    """Where an endpoint sends its calls, as configured (None: in-process adapter)."""
    for key in _ENDPOINT_OPTIONS:
        value = spec.options.get(key)
        if isinstance(value, str):
            return value
    return None


def _budget(section: BudgetSection | None) -> Budget | None:
    if section is None:
        return None
    return Budget(
        max_calls=section.max_calls,
        max_tokens=section.max_tokens,
        max_cost=section.max_cost,
        prices={name: Price(*pair) for name, pair in section.prices.items()},
    )


def _cache_url(section: CacheSection, source: TomlSource) -> str | None:
    url = section.url
    if url is None:
        return None
    if section.path is not None:
        raise _fail(source, ["cache", "url"], "[cache] path and url exclude each other; keep one")
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise _fail(source, ["cache", "url"], "[cache] url must start with postgresql://")
    if parts.password:
        raise _fail(
            source,
            ["cache", "url"],
            "[cache] url holds a password; run files never hold secrets: use PGPASSWORD or "
            "a .pgpass file",
        )
    try:
        check_url(url)
        check_table(section.table)
    except ConfigError as exc:
        raise _fail(source, ["cache", "url"], f"[cache]: {exc.message}") from None
    return url


def _cluster(section: ClusterSection | None, source: TomlSource) -> ClusterSpec | None:
    if section is None:
        return None
    address = section.address
    if address not in ("local", "auto") and not _RAY_ADDRESS.match(address):
        raise _fail(
            source,
            ["cluster", "address"],
            f"[cluster] address must be 'local', 'auto' or 'ray://host:port', got {address!r}",
        )
    return ClusterSpec(address=address, workers=section.workers)


def _metric(section: MetricSection, source: TomlSource) -> None:
    for key, spec in (("use", section.use), ("global", section.global_metric)):
        if spec is not None and not _SPEC.match(spec):
            raise _fail(
                source, ["metric", key], f"[metric] {key} must be 'module:callable', got {spec!r}"
            )


def _columns(schema: RunFileSchema) -> ColumnMap:
    section = schema.data
    return ColumnMap(
        inputs=section.inputs,
        expected=section.expected,
        id=section.id,
        metadata=section.metadata,
    )


def _no_such(path: Path, base: Path) -> str:
    """A missing input, with the rule a copied run file trips over and the fix."""
    folder = os.path.abspath(base) + os.sep
    return (
        f"no such file {path} (paths are relative to the run file's folder: {folder}); "
        "copy the run file together with its folder, or give the path from that folder"
    )


def _datasets(
    schema: RunFileSchema, base: Path, load: bool, source: TomlSource
) -> tuple[list[Example], list[Example] | None, Path, Path | None]:
    section = schema.data
    train_path = _absolute(base, section.train)
    val_path = _absolute(base, section.val) if section.val else None
    for key, path in (("train", train_path), ("val", val_path)):
        if path is not None and not path.exists():
            raise _fail(source, ["data", key], f"[data] {key}: {_no_such(path, base)}")
    if not load:  # a cluster reads them (Ray Data): the driver never holds the rows
        return [], None, train_path, val_path
    try:
        train, val = load_splits(train_path, val_path, _columns(schema))
    except DataError as exc:  # where the run file names the data, then the row
        key = "val" if val_path is not None and str(val_path) in exc.message else "train"
        raise _fail(source, ["data", key], f"[data] {key}: {exc.message}") from None
    return train, val, train_path, val_path


def _code_names(data: Mapping[str, Any]) -> list[str]:
    """Every ``"module:attr"`` the file names (``use``, ``adapter``, ``global`` keys)."""
    found: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            found += _code_names(value)
        elif key in ("use", "adapter", "global") and isinstance(value, str) and _SPEC.match(value):
            found.append(value)
    return found


def _absolute(base: Path, name: str | Path) -> Path:
    # absolute without resolving symlinks: an output path that is a link must be seen
    return Path(os.path.abspath(base / name))


def load_run_file(path: str | os.PathLike[str], *, load_data: bool = True) -> RunFile:
    """Parse and validate a run file, loading its datasets; raises `ConfigError`.

    Every check of the file itself runs before the first dataset row is read.
    ``load_data=False`` leaves ``train`` and ``val`` empty (their paths and
    ``columns`` are set): a cluster run streams them instead.
    """
    p = Path(path)
    source, data = _read(p)
    schema = decode_run_file(data, source)
    base = p.parent
    for spec in _code_names(data):  # the user's modules, from wherever the command runs
        import_root(spec.partition(":")[0], base)
    _metric(schema.metric, source)
    cache, cache_url = schema.cache, _cache_url(schema.cache, source)
    cluster = _cluster(schema.cluster, source)
    prompt, prompt_file, program = _prompts(schema, base, source)
    model, optimizer, batch = (
        _endpoint(getattr(schema, name), name, source) for name in ("model", "optimizer", "batch")
    )
    assert model is not None  # the schema requires [model]
    optimizer = inherit_endpoint(optimizer, model)
    train, val, train_path, val_path = _datasets(schema, base, load_data, source)
    return RunFile(
        path=p,
        prompt=prompt,
        train=train,
        val=val,
        metric_spec=schema.metric.use,
        metric_options=schema.metric.options,
        model=model,
        optimizer=optimizer,
        batch=batch,  # optional bulk path for `evaluate`
        trainer={k: v for k, v in msgspec.structs.asdict(schema.trainer).items() if v is not None},
        budget=_budget(schema.budget),
        cache_path=_absolute(base, cache.path) if cache.path else None,
        cache_flush_interval=cache.flush_interval or 0.2,
        output_dir=_absolute(base, schema.output.dir),
        global_metric_spec=schema.metric.global_metric,
        metric_timeout=schema.metric.timeout,
        metric_threads=schema.metric.threads,
        cache_url=cache_url,
        cluster=cluster,
        train_path=train_path,
        val_path=val_path,
        prompt_file=_absolute(base, prompt_file) if prompt_file else None,
        cache_table=cache.table,
        raw=data,
        columns=_columns(schema),
        data_loaded=load_data,
        **program,
    )
