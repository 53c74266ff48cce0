"""What every audience's commands share: argument types and groups, flags made from settings
fields, the plain error, running another program in this process's place."""

from __future__ import annotations

import argparse
import os
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic_settings import BaseSettings

Settings = TypeVar("Settings", bound=BaseSettings)

# The name of the connection `federimed enroll/submit` write into their private FLWR_HOME.
CONNECTION = "federimed"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run_id(text: str) -> str:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a run id is a number (see `flwr ls`), got {text!r}")
    return text


def _hospital_names(count: int) -> list[str]:
    return [f"hospital-{i}" for i in range(1, count + 1)]


class UserError(Exception):
    """Something the user can fix; printed without a traceback."""


def _exec(argv: list[str]) -> int:
    from federimed.deploy.flower import flower_env

    print("exec:", " ".join(argv), flush=True)
    env = flower_env()
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def _with_flags(model: type[Settings], args: argparse.Namespace) -> Settings:
    """A component's settings: its FEDERIMED_* variables, overridden by the flags given (those
    `settings_flag` added; an unset one is None and leaves the variable or default in force)."""
    given = {name: getattr(args, name, None) for name in model.model_fields}
    return model(**{name: value for name, value in given.items() if value is not None})


def _env_variable(model: type[BaseSettings], name: str) -> str:
    """The variable pydantic-settings reads for field NAME: prefix + name, in capitals as
    compose and the manifests write it (the match is case-insensitive)."""
    return f"{model.model_config.get('env_prefix', '')}{name}".upper()


def settings_flag(
    parser: argparse.ArgumentParser, model: type[BaseSettings], name: str, **kwargs: Any
) -> argparse.Action:
    """--NAME for the settings field NAME, its help, default and type taken from the field so
    that the flag, the variable and the settings class cannot tell different stories.  It has
    no argparse default: unset, the variable (or the field's default) stays in force, as
    `_with_flags` reads it.  KWARGS (a stricter ``type=``, say) win over what is derived."""
    field, env = model.model_fields[name], _env_variable(model, name)
    if field.is_required():
        where = f"required: this flag or {env}"
    else:
        default = field.get_default(call_default_factory=True)
        where = f"default: {'unset' if default is None else default}; env {env}"
    help_text = f"{(field.description or name).rstrip('.')} ({where})"
    derived: dict[str, Any] = {"help": help_text.replace("%", "%%")}  # argparse expands %(...)s
    value_type = _without_none(field.annotation)
    if get_origin(value_type) is Literal:
        derived["choices"] = get_args(value_type)
    elif value_type in (int, float, str, Path):
        derived["type"] = value_type
    elif "type" not in kwargs:
        raise TypeError(f"{model.__name__}.{name}: no flag type for {value_type!r}; pass type=")
    return parser.add_argument(f"--{name.replace('_', '-')}", **(derived | kwargs))


def _without_none(annotation: Any) -> Any:
    """X for ``X | None`` (an optional setting's flag takes an X); anything else as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _connection_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--superlink", required=required, help="SuperLink address HOST:PORT")
    parser.add_argument("--ca-cert", type=Path, required=required, help="CA that signed it")
    parser.add_argument(
        "--flwr-home",
        default=".flwr-federimed",
        help="private Flower CLI config folder (default: %(default)s)",
    )


def _run_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app", type=Path, help="Flower app folder (default: this package)")
    parser.add_argument(
        "--run-config",
        metavar="'KEY=VALUE ...'",
        help="run-config overrides, e.g. 'num-server-rounds=3 strategy=\"fedprox\"' "
        "(keys and defaults: `federimed config show`)",
    )


def _out_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        required=required,
        help="the local federation's folder (what `federimed up --out` was given)",
    )


def _netns_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--netns",
        choices=["auto", "on", "off"],
        default="auto",
        help="run each hospital in its own network namespace (needs root and iproute2; "
        "auto and on refuse to start without them; off: hospitals share loopback and can "
        "reach the SuperLink's Control API, for a trial on one machine)",
    )


def _listen_args(parser: argparse.ArgumentParser, model: type[BaseSettings]) -> None:
    """--host and --port of a web service whose settings MODEL has both fields."""
    settings_flag(parser, model, "host")
    settings_flag(parser, model, "port")


def _flwr_home(args: argparse.Namespace) -> Path:
    from federimed.deploy.flower import write_flwr_home

    home = Path(args.flwr_home)
    write_flwr_home(home, CONNECTION, args.superlink, args.ca_cert)
    return home


def _connection(args: argparse.Namespace) -> tuple[Path, str, dict]:
    """The private FLWR_HOME, connection name and deployment's run overrides: from `up`'s
    record, or from the flags (a remote SuperLink, whose deployment we know nothing of)."""
    if args.out is not None:
        from federimed.deploy.local import CONNECTION as LOCAL
        from federimed.deploy.local import RunningFederation

        running = RunningFederation.attach(args.out)
        return running.flwr_home, LOCAL, running.run_overrides()
    if not (args.superlink and args.ca_cert):
        raise UserError(
            "submit needs --out DIR (a federation from `federimed up`) or both "
            "--superlink HOST:PORT and --ca-cert FILE"
        )
    return _flwr_home(args), CONNECTION, {}
