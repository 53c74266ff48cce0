"""Hospital IT's commands: the SuperNode and its app runner, the app bundle a hospital approves,
its site policy's privacy budget, its egress ledger and the metrics read from it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from federimed.cli.common import _exec, _listen_args, _with_flags, settings_flag


def cmd_supernode(args: argparse.Namespace) -> int:
    from federimed.deploy.flower import supernode_argv
    from federimed.settings import SuperNodeSettings

    return _exec(supernode_argv(SuperNodeSettings()))


def cmd_superexec(args: argparse.Namespace) -> int:
    """Flower's SuperExec in this process, so that it starts ClientApps (or, for the
    consortium, ServerApps) and no other task type, each ClientApp in a clean room
    (federimed.hospital.site_runner) instead of plain `flwr-clientapp`."""
    from flwr.supercore.cli import flower_superexec

    from federimed.deploy.flower import flower_env, superexec_argv, wait_for_listener
    from federimed.hospital import site_runner
    from federimed.hospital.site_runner import use_site_clientapp
    from federimed.hospital.warm import WarmStarter, use_warm_starts
    from federimed.settings import SuperExecSettings

    settings = SuperExecSettings()
    argv = superexec_argv(settings)
    print("run:", " ".join(argv), flush=True)
    os.environ.update(flower_env())
    # Flower's SuperExec asks its node for a new task every second; the question is a local
    # call, so asking five times a second costs nothing and starts each round's task sooner.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    use_site_clientapp()
    if settings.warm_start:
        use_warm_starts(WarmStarter(site_runner.COMMAND))
    sys.argv = argv
    for sig in (signal.SIGINT, signal.SIGTERM):  # Flower's own handlers stop its tasks
        signal.signal(sig, signal.SIG_DFL)
    wait_for_listener(settings.runtime_api, say=lambda text: print(text, flush=True))
    flower_superexec()
    return 0


def cmd_app_hash(args: argparse.Namespace) -> int:
    from federimed.config import find_app_dir
    from federimed.deploy.flower import app_hash

    print(app_hash(args.app_dir or find_app_dir()))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from federimed.hospital.policy import approve

    added = approve(args.policy, args.hash, note=args.note, site=args.site, ledger=args.ledger)
    print(f"{'approved' if added else 'already approved'}: {args.hash} in {args.policy}")
    return 0


def cmd_ledger_show(args: argparse.Namespace) -> int:
    from federimed.hospital.ledger import entries

    for number, entry in entries(args.path):
        if args.format == "json":
            print(json.dumps(entry, sort_keys=True))
            continue
        what = (
            f"ERROR {entry['error']}"
            if entry.get("error")
            else (f"{entry['bytes']} bytes, metrics {sorted(entry.get('metrics') or {})}")
        )
        print(
            f"{number:>5} {entry['time']} run {entry['run_id']} round {entry['round']} "
            f"{entry['kind']}: {what}"
        )
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from federimed.hospital.ledger import LedgerError, verify

    try:
        count = verify(args.path, args.anchor)
    except LedgerError as error:
        print(f"ledger does not verify: {error}", file=sys.stderr)
        return 1
    anchored = f", and line {args.anchor.partition(':')[0]} is the anchor's" if args.anchor else ""
    print(f"{args.path}: {count} entries, hash chain intact{anchored}")
    return 0


def cmd_privacy_show(args: argparse.Namespace) -> int:
    from federimed.hospital.policy import load_policy
    from federimed.hospital.privacy import budget_report

    print(budget_report(load_policy(args.policy)))
    return 0


def cmd_ledger_anchor(args: argparse.Namespace) -> int:
    from federimed.hospital.ledger import LedgerError, anchor

    try:
        print(anchor(args.path))
    except LedgerError as error:
        print(f"ledger does not verify, so it gets no anchor: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    from federimed.hospital.site_exporter import serve
    from federimed.settings import ExporterSettings

    settings = _with_flags(ExporterSettings, args)
    where = f"http://{settings.host}:{settings.port}/metrics"
    print(f"exporting {settings.ledger} on {where}", flush=True)
    serve(settings.ledger, settings.host, settings.port)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Hospital IT: the SuperNode, the app bundle it approves, privacy budget, ledger, metrics."""
    from federimed.settings import ExporterSettings

    for name, func, text in (
        ("supernode", cmd_supernode, "run a hospital's SuperNode (settings: FEDERIMED_NODE_*)"),
        ("superexec", cmd_superexec, "run an app runner (settings: FEDERIMED_SUPEREXEC_*)"),
    ):
        sub.add_parser(name, help=text).set_defaults(func=func)

    app = sub.add_parser("app", help="the app bundle hospitals approve").add_subparsers(
        dest="app_command", required=True, metavar="COMMAND"
    )
    hash_ = app.add_parser("hash", help="SHA-256 of the app bundle exactly as `flwr run` builds it")
    hash_.add_argument("app_dir", nargs="?", type=Path, help="default: this project")
    hash_.set_defaults(func=cmd_app_hash)

    approve = sub.add_parser(
        "approve",
        help="add an app bundle hash to a hospital's site policy",
        description="Add HASH (from `federimed app hash`) to the site policy FILE; only "
        "approved bundles run on the hospital's data. A new FILE needs --site.",
    )
    approve.add_argument("hash", metavar="HASH")
    approve.add_argument("--policy", type=Path, required=True, metavar="FILE")
    approve.add_argument("--site", help="the hospital's id, when FILE is created")
    approve.add_argument("--note", default="", help="why / what was reviewed")
    approve.add_argument(
        "--ledger",
        default="egress-ledger.jsonl",
        help="where a new policy's egress ledger goes (writable; relative to FILE's folder)",
    )
    approve.set_defaults(func=cmd_approve)

    privacy = sub.add_parser(
        "privacy", help="the hospital's differential-privacy budget"
    ).add_subparsers(dest="privacy_command", required=True, metavar="COMMAND")
    privacy_show = privacy.add_parser(
        "show",
        help="ε spent and left, per run and in all, read from the ledger",
        description="Reads the site policy FILE's privacy section and the egress ledger it "
        "names: for each run, the ε its training replies spent (at the policy's δ) and what is "
        "left of the per-run budget; then the lifetime total and what is left of it.",
    )
    privacy_show.add_argument("--policy", type=Path, required=True, metavar="FILE")
    privacy_show.set_defaults(func=cmd_privacy_show)

    ledger = sub.add_parser("ledger", help="the hospital's egress ledger").add_subparsers(
        dest="ledger_command", required=True, metavar="COMMAND"
    )
    show = ledger.add_parser("show", help="every reply that left, one line each")
    show.add_argument("path", type=Path)
    show.add_argument("--format", choices=("text", "json"), default="text")
    show.set_defaults(func=cmd_ledger_show)
    verify = ledger.add_parser(
        "verify", help="check the hash chain; exit 1 naming the first line that breaks"
    )
    verify.add_argument("path", type=Path)
    verify.add_argument(
        "--anchor",
        metavar="LINES:HASH",
        help="a value `ledger anchor` printed earlier: the ledger must still end there as then",
    )
    verify.set_defaults(func=cmd_ledger_verify)
    anchor = ledger.add_parser(
        "anchor",
        help="print LINES:HASH, the chain's head, to keep outside the hospital's volume",
        description=(
            "The hash chain shows a changed, dropped or reordered line, but whoever can write "
            "the file could rewrite it whole and chain it anew.  Keep this short value "
            "elsewhere (a ticket, a signed mail); `ledger verify --anchor VALUE` later fails on "
            "any rewrite of the lines it covers."
        ),
    )
    anchor.add_argument("path", type=Path)
    anchor.set_defaults(func=cmd_ledger_anchor)

    exporter = sub.add_parser(
        "exporter",
        help="a hospital's Prometheus metrics, read from its egress ledger",
        description="Serves /metrics for one hospital: replies that left by kind, bytes sent, "
        "training steps and examples behind them, the last training loss, tasks refused by "
        "code, and whether the ledger's hash chain verifies. It reads the ledger at each "
        "scrape and nothing else. Each flag names its FEDERIMED_EXPORTER_* variable; a flag "
        "given wins over the variable.",
    )
    settings_flag(exporter, ExporterSettings, "ledger")
    _listen_args(exporter, ExporterSettings)
    exporter.set_defaults(func=cmd_exporter)
