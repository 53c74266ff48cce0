"""`federimed`: one command line for hospital IT, operators and researchers.

Errors a person can fix (bad data, bad settings, a missing file, a process that died) are
printed as one plain message naming what and where, with exit code 2; never a bare traceback
(``federimed --debug ...`` shows it).  This module alone owns SIGINT and SIGTERM: either ends
any command with exit code 130 after everything it started was stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from pydantic import ValidationError

from federimed.cli import hospital, operators, research
from federimed.cli.common import UserError

EXAMPLES = """\
examples:
  federimed demo                                  # the whole thing: 3 hospitals, real Flower
  federimed config show --format json             # effective run config, where each value is from
  federimed up --hospitals 3 --out runs/fed       # a local federation that keeps running
  federimed submit --out runs/fed --stream        # a training run on it; then: status, down
  federimed data synth --hospitals 3 --out data   # synthetic hospitals + common test set
  federimed data validate data/hospital-1         # check a data folder before training
  federimed certs --out certs --hospitals 3       # CA, SuperLink and gateway certs, node keys
  federimed app hash                              # the bundle hash a hospital approves
  federimed approve --policy site.yaml HASH       # approve it in a hospital's site policy
  federimed ledger verify sites/h1/egress-ledger.jsonl  # prove what left a hospital
  federimed ledger anchor sites/h1/egress-ledger.jsonl  # a value to keep elsewhere
  federimed predict --model runs/demo/model "58M c/o crushing CP, ST elevation..."
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="federimed",
        description="Train clinical language models across hospitals without sharing records.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    research.register(sub)
    operators.register(sub)
    hospital.register(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT and SIGTERM: remember the request (every wait loop checks it within a second,
    even if a library swallows the exception) and interrupt what runs now."""
    from federimed.deploy.processes import request_stop

    request_stop()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from federimed.data.records import DataError
    from federimed.deploy.flower import HARDENED_ENV, DeploymentError
    from federimed.deploy.processes import ProcessDied, clear_stop

    os.environ.update(HARDENED_ENV)  # this process and all it starts: no telemetry
    # Offline like a hospital; HF_HUB_OFFLINE=0 lets `--model <hub id>` download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    clear_stop()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; all processes were stopped", file=sys.stderr)
        return 130
    except ValidationError as error:
        _debug(args)
        print(f"error: invalid settings:\n{_settings_problems(error)}", file=sys.stderr)
        return 2
    except (
        UserError,
        DataError,
        DeploymentError,
        ProcessDied,
        FileNotFoundError,
        ValueError,
        TimeoutError,
        RuntimeError,
    ) as error:
        _debug(args)
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _debug(args: argparse.Namespace) -> None:
    if args.debug:
        traceback.print_exc()


def _settings_problems(error: ValidationError) -> str:
    from federimed import settings

    refusing = getattr(settings, error.title, None)  # the settings class, by its name
    prefix = getattr(refusing, "model_config", {}).get("env_prefix", "FEDERIMED_")
    return "\n".join(
        f"  {prefix}{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
        for e in error.errors()
    )
