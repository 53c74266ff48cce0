"""A hospital's site policy: what may run on its data and what may leave, decided by the hospital.

The file (YAML, ``FEDERIMED_SITE_POLICY``) is the hospital's, mounted read-only into its
SuperNode's container; nothing the consortium sends (run config, app code) can loosen it.  One
side reads it: the guard in the hospital's SuperNode (:mod:`federimed.hospital.guard`: app
approval by hash, task types, floors and caps, the shape of every reply, the metric allow-list,
the clip on each update's norm, error replies without record content, the egress ledger).  The
consortium's app never reads it and is never trusted to apply it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

POLICY_ENV = "FEDERIMED_SITE_POLICY"
# A policy is a page of YAML; a bigger file is not one, and is not read into memory.
MAX_POLICY_BYTES = 1024 * 1024
# What FederiMed's own app reports (training.py): a new policy allows exactly these.
DEFAULT_METRICS = (
    "num_examples",
    "train_loss",
    "val_accuracy",
    "val_loss",
    "accuracy",
    "loss",
    "macro_f1",
    # where a round's time went at the hospital (process start, loading, computing)
    "startup_seconds",
    "load_seconds",
    "compute_seconds",
)


class PolicyError(ValueError):
    """The policy file is missing or wrong; the message names the file and the field."""


class SiteRefusal(Exception):
    """The hospital refuses a task. ``str()`` is what the server sees: the site, a reason with
    no record content, and a code; details stay in the hospital's own log."""

    def __init__(self, site: str, code: str, reason: str):
        self.site = site
        self.code = code
        super().__init__(f"{reason} [refused by {site}, code {code}]")


# How a refusal's text ends ("... [refused by hospital-2, code APP_NOT_APPROVED]", or
# "... [code TASK_FAILED]" when the runner has no reason of its own): what reads the ledger
# back (the hospital's exporter) finds the code by it.
_CODE_AT_END = re.compile(r"\bcode ([A-Z0-9_]+)\]\s*$")


def refusal_code(reason: str) -> str:
    """The code a refusal's text ends with; ``OTHER`` for a text that names none."""
    found = _CODE_AT_END.search(reason)
    return found.group(1) if found else "OTHER"


class Floors(BaseModel):
    """Lower bounds on what one update is built from: small ones reveal single cases.

    Whole numbers only (``true`` is not 1), and no higher than any run could meet: the
    run config's own maxima for batch-size and local-steps.  A floor above them refuses every
    task, which is a typo better refused when the hospital starts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    batch_size: int = Field(4, ge=1, le=8192, description="smallest batch-size a run may use")
    local_steps: int = Field(1, ge=1, le=1_000_000, description="fewest local-steps per update")
    examples_per_update: int = Field(
        16, ge=1, le=10_000_000, description="fewest distinct cases one update may be trained on"
    )


class Privacy(BaseModel):
    """The hospital's differential-privacy budget (record level: docs/privacy.md).  Its guard
    turns each training task's numbers and the hospital's own case count into ε at ``delta``
    (federimed.hospital.privacy) and refuses what this does not allow."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    required: bool = Field(False, description="every training task must use DP-SGD")
    # not strict: YAML reads 1e-5 (no dot) as text
    delta: float = Field(
        1e-5, gt=0, lt=1, strict=False, description="δ; keep it below 1 / training cases"
    )
    epsilon_per_run: float | None = Field(None, gt=0, description="most ε one run may spend")
    lifetime_epsilon: float | None = Field(
        None, gt=0, description="most ε all runs together may spend (basic composition)"
    )
    max_grad_norm: float | None = Field(
        None, gt=0, description="the largest per-case clip (dp-max-grad-norm) a run may use"
    )


class ApprovedApp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    note: str = ""


class SitePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    site: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="the hospital's id")
    approved_apps: list[ApprovedApp] = Field(default_factory=list)
    floors: Floors = Field(default_factory=Floors)
    metrics_allowed: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    max_update_norm: float | None = Field(
        None,
        gt=0,
        strict=True,  # a number (NaN and infinity refused), not true/false or text
        description="L2 clip on each update (new minus received weights)",
    )
    ledger: Path = Field(description="the egress ledger, on the hospital's own volume")
    max_train_rounds: int | None = Field(
        None, ge=1, strict=True, description="most training replies one run gets (none: no cap)"
    )
    max_evaluations: int | None = Field(
        None, ge=1, strict=True, description="most evaluation replies one run gets (none: no cap)"
    )
    privacy: Privacy = Field(default_factory=Privacy)

    @field_validator("ledger")
    @classmethod
    def _a_usable_path(cls, value: Path) -> Path:
        if "\x00" in str(value) or not str(value).strip():
            raise ValueError("must be a file path (not empty, no NUL character)")
        return value

    def approves(self, app_hash: str) -> bool:
        return any(app.sha256 == app_hash for app in self.approved_apps)

    def check_floors(self, batch_size: int, local_steps: int, examples: int) -> None:
        """Refuse a training task below any floor, naming the rule."""
        asked = {
            "batch_size": (batch_size, "batch-size"),
            "local_steps": (local_steps, "local-steps"),
            "examples_per_update": (examples, "cases in one update"),
        }
        for rule, (value, what) in asked.items():
            floor = getattr(self.floors, rule)
            if value < floor:
                raise SiteRefusal(
                    self.site,
                    "POLICY_FLOOR",
                    f"{what}={value} is below the site policy's floor floors.{rule}={floor}",
                )

    def split_metrics(self, metrics: Mapping[str, object]) -> tuple[dict, list[str]]:
        """(the metrics that may leave, the names held back)."""
        allowed = set(self.metrics_allowed)
        kept = {name: value for name, value in metrics.items() if name in allowed}
        return kept, sorted(set(metrics) - allowed)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice: plain YAML keeps the last one silently, which
    in a policy could loosen a floor written further up."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # an unhashable key: PyYAML's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read(path: Path) -> dict:
    """The policy file as YAML data; errors name the file (and the line).

    UTF-8 (a byte-order mark is fine), at most MAX_POLICY_BYTES, one YAML mapping."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as error:
        raise PolicyError(f"{POLICY_ENV}={path}: cannot read the site policy ({error})") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: larger than {MAX_POLICY_BYTES} bytes; not a site policy")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PolicyError(f"{path}, line {line}: not UTF-8 text") from None
    if not text.strip():
        raise PolicyError(f"{path}: the file is empty; a site policy needs site: and ledger:")
    try:
        parsed = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as error:
        raise PolicyError(f"{path}{_yaml_line(error, text)}: not valid YAML ({error})") from None
    except RecursionError:
        raise PolicyError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(parsed, dict):
        raise PolicyError(f"{path}: a site policy is a YAML mapping (site:, approved_apps:, ...)")
    return parsed


def _yaml_line(error: yaml.YAMLError, text: str) -> str:
    """', line N' where PyYAML knows it: a mark, or a reader error's character position."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return f", line {mark.line + 1}"
    position = getattr(error, "position", None)
    if isinstance(position, int):
        return f", line {text.count(chr(10), 0, position) + 1}"
    return ""


def _validate(path: Path, data: dict) -> SitePolicy:
    """Errors name the file and each field."""
    try:
        return SitePolicy.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise PolicyError(f"{path}: {problems}") from None


def load_policy(path: Path) -> SitePolicy:
    path = Path(path)
    policy = _validate(path, _read(path))
    if not policy.ledger.is_absolute():
        policy.ledger = (path.parent / policy.ledger).resolve()
    return policy


def policy_from_env(environ: Mapping[str, str] = os.environ) -> SitePolicy:
    path = environ.get(POLICY_ENV)
    if not path:
        raise PolicyError(
            f"{POLICY_ENV} is not set: this hospital has no site policy, so it runs nothing"
        )
    return load_policy(Path(path))


def approve(
    path: Path,
    app_hash: str,
    note: str = "",
    site: str | None = None,
    ledger: str = "egress-ledger.jsonl",
) -> bool:
    """Add ``app_hash`` to the policy at ``path``; False if it was there already.  A new
    policy needs ``site`` and gets the default floors and allow-list, and ``ledger`` (relative
    paths are taken from the policy's folder).  The file is rewritten: YAML comments do not
    survive."""
    if not re.fullmatch(r"[0-9a-f]{64}", app_hash):
        raise PolicyError(f"{app_hash!r}: an app hash is 64 hex digits (`federimed app hash`)")
    path = Path(path)
    if path.exists():
        data = _read(path)
    elif site:
        new = _validate(path, {"site": site, "ledger": ledger})
        data = new.model_dump(mode="json") | {"ledger": ledger}
    else:
        raise PolicyError(f"{path}: no such policy; pass --site to create it")
    if _validate(path, data).approves(app_hash):
        return False
    data.setdefault("approved_apps", []).append({"sha256": app_hash, "note": note})
    _validate(path, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return True


def clip_update(
    received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], max_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale the update (trained minus received) down to ``max_norm`` in L2; (arrays, norm
    before clipping).  The arithmetic is float32, as the arrays travel."""
    deltas = {
        name: trained[name].astype(np.float32) - received[name].astype(np.float32)
        for name in trained
    }
    squares = (float(np.square(delta, dtype=np.float64).sum()) for delta in deltas.values())
    norm = math.sqrt(sum(squares))
    if norm <= max_norm:
        return dict(trained), norm
    scale = np.float32(max_norm / norm)
    clipped = {
        name: (received[name].astype(np.float32) + deltas[name] * scale).astype(trained[name].dtype)
        for name in trained
    }
    return clipped, norm
