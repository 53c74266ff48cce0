"""What every audience's commands share: argument types and groups, the plain error, running
another program in this process's place."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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


def _with_flags(model, args: argparse.Namespace, *names: str):
    """A component's settings: its FEDERIMED_* variables, overridden by the flags given."""
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return model(**given)


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


def _listen_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help=f"HTTP port (default {port})")


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
