"""The effective run configuration as the CLI sees it, and where each value came from.

Three layers, later ones winning: ``default`` (the app's ``[tool.flwr.app.config]``, the only
place defaults are written, with ``track`` on top: its track's own starting values,
``[tool.federimed.track-defaults.<track>]``), ``env`` (``FEDERIMED_RUN_<KEY>``, e.g.
``FEDERIMED_RUN_NUM_SERVER_ROUNDS=2``, or several in ``FEDERIMED_RUN_CONFIG='k=v ...'``, which
the single-key variables override) and ``flag`` (``--run-config 'key=value ...'`` and the
named flags such as ``--rounds``).  A local federation adds a ``deployment`` layer between
defaults and env (its hospitals, test set and output folder).  Only what is not a default is
sent to Flower as overrides; Flower supplies the defaults to the apps from the same table.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federimed.runconfig import RunConfig, RunConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as Flower's own dependency
    import tomli as tomllib

ENV_PREFIX = "FEDERIMED_RUN_"
# All of the overrides in one variable, as `--run-config` takes them (compose passes this one).
ENV_PAIRS = "FEDERIMED_RUN_CONFIG"
# The syntax `flwr run --run-config` accepts (flwr.common.config.parse_config_args).
PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def find_app_dir(explicit: Path | None = None) -> Path:
    """The folder with the Flower app's pyproject.toml (the repo root, or /app in images)."""
    candidates = [explicit] if explicit else [Path(__file__).resolve().parents[1], Path.cwd()]
    for candidate in candidates:
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text():
            return candidate
    raise FileNotFoundError(
        f"no Flower app (pyproject.toml with [tool.flwr.app]) in "
        f"{', '.join(map(str, candidates))}; pass --app DIR"
    )


def _pyproject(app_dir: Path) -> dict[str, Any]:
    with (app_dir / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app: the run configuration's defaults."""
    try:
        return dict(_pyproject(app_dir)["tool"]["flwr"]["app"]["config"])
    except KeyError:
        raise RunConfigError(f"{app_dir / 'pyproject.toml'}: no [tool.flwr.app.config]") from None


def track_defaults(app_dir: Path, track: str) -> dict[str, Any]:
    """``[tool.federimed.track-defaults.<track>]``: where a track starts from other than the
    app's defaults (the generative track's causal LM wants other sizes than the encoder)."""
    tables = _pyproject(app_dir).get("tool", {}).get("federimed", {}).get("track-defaults", {})
    return dict(tables.get(track, {}))


def parse_pairs(text: str, where: str = "--run-config") -> dict[str, Any]:
    """``key=value ...`` with TOML values, as `flwr run --run-config` reads them; unlike Flower,
    text that is not a pair is an error rather than silently ignored."""
    values: dict[str, Any] = {}
    leftover = PAIR.sub("", text).strip()
    if leftover:
        raise RunConfigError(f"{where}: cannot read {leftover!r}; write key=value pairs")
    for key, raw in PAIR.findall(text):
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            raise RunConfigError(
                f"{where}: {key}={raw} is not a valid value "
                '(numbers, true/false, or quoted text such as key="text")'
            ) from None
    return values


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``FEDERIMED_RUN_CONFIG`` pairs, then ``FEDERIMED_RUN_<KEY>`` variables (a value that is
    not TOML is taken as text)."""
    values = parse_pairs(environ.get(ENV_PAIRS, ""), where=ENV_PAIRS)
    allowed = {_env_name(key): key for key in RunConfig.key_names()}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PAIRS:
            continue
        if name not in allowed:
            raise RunConfigError(
                f"environment variable {name} is not a run-config setting; "
                f"allowed: {ENV_PAIRS}, {', '.join(sorted(allowed))}"
            )
        try:
            values[allowed[name]] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[allowed[name]] = raw
    return values


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.replace("-", "_").upper()


@dataclass(frozen=True)
class EffectiveConfig:
    """The validated run configuration plus each key's source."""

    run: RunConfig
    sources: dict[str, str]

    @property
    def overrides(self) -> dict[str, Any]:
        """What differs from the app's defaults: all that `flwr run` needs to be told."""
        values = self.run.to_flower()
        return {key: values[key] for key, source in self.sources.items() if source != "default"}

    def as_table(self) -> dict[str, dict[str, Any]]:
        values = self.run.to_flower()
        return {key: {"value": values[key], "source": self.sources[key]} for key in values}

    def to_json(self) -> str:
        return json.dumps(self.as_table(), indent=2)

    def to_text(self) -> str:
        width = max(len(key) for key in self.sources)
        return "\n".join(
            f"{key:<{width}}  {json.dumps(entry['value']):<24} ({entry['source']})"
            for key, entry in self.as_table().items()
        )


def resolve(
    app_dir: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    run_config: str = "",
    environ: Mapping[str, str] | None = None,
    deployment: Mapping[str, Any] | None = None,
) -> EffectiveConfig:
    """Defaults, then what the deployment decides (e.g. the local federation's test set),
    then env, then flags (``flags`` and the ``--run-config`` text); validated."""
    app_dir = find_app_dir(app_dir)
    values = app_defaults(app_dir)
    sources = dict.fromkeys(values, "default")
    layers = [
        ("deployment", dict(deployment or {})),
        ("env", env_overrides(os.environ if environ is None else environ)),
        ("flag", parse_pairs(run_config)),
        ("flag", {k: v for k, v in (flags or {}).items() if v is not None}),
    ]
    track = next((layer["track"] for _, layer in reversed(layers) if "track" in layer), None)
    layers.insert(0, ("track", track_defaults(app_dir, track or values.get("track", ""))))
    for source, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    run = RunConfig.from_flower(values)
    return EffectiveConfig(run, {key: sources[key] for key in RunConfig.key_names()})


def to_toml_pairs(values: Mapping[str, Any]) -> str:
    """The ``--run-config`` text for ``values`` (what :func:`parse_pairs` reads back)."""
    return " ".join(f"{key}={_toml(value)}" for key, value in values.items())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)
