"""`federimed`: one command line for hospital IT, operators and researchers.

Errors a person can fix (bad data, bad settings, a missing file, a process that died) are
printed as one plain message naming what and where, with exit code 2; never a bare traceback
(``federimed --debug ...`` shows it).  This module alone owns SIGINT and SIGTERM: either ends
any command with exit code 130 after everything it started was stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

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


# --- data -----------------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> int:
    from federimed.data.synth import SynthConfig, generate, write_dataset

    config = SynthConfig(
        hospitals=args.hospitals,
        seed=args.seed,
        alpha=args.alpha,
        cases_per_hospital=args.cases_per_hospital,
        held_out_style=args.held_out_style,
    )
    dataset = generate(config)
    write_dataset(dataset, args.out)
    for hospital in dataset.hospitals:
        print(
            f"{hospital.name}: {len(hospital.train)} train, {len(hospital.validation)} "
            f"validation, never saw {len(hospital.unseen)} conditions "
            f"({', '.join(hospital.unseen)})"
        )
    print(f"test: {len(dataset.test)} cases over {len(dataset.labels)} conditions -> {args.out}")
    print(f"test-unseen-style: {len(dataset.unseen_style_test)} cases written in the held-out "
          f"style {dataset.held_out_style!r}, which no hospital writes in")  # fmt: skip
    if args.track == "generative":
        from federimed.data.flashcards import from_cases, write_flashcards

        cards = from_cases(dataset)
        write_flashcards(cards, args.out)
        for carded in cards.hospitals:
            print(f"{carded.name}: {len(carded.train)} flashcards, {len(carded.validation)} "
                  "validation")  # fmt: skip
        print(f"test: {len(cards.test)} flashcards -> {args.out / 'test-flashcards.jsonl'}")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from federimed.data.records import FLASHCARD_STEMS, SPLITS, SUFFIXES

    path: Path = args.path
    if path.is_dir():
        cases = [f for f in path.rglob("*") if f.suffix in SUFFIXES and f.stem in SPLITS]
        cards = [f for f in path.rglob("*")
                 if f.suffix in (".jsonl", ".json") and f.stem in FLASHCARD_STEMS]  # fmt: skip
    elif path.exists():
        flashcards = args.flashcards or path.stem in FLASHCARD_STEMS
        cases, cards = ([], [path]) if flashcards else ([path], [])
    else:
        raise UserError(f"{path}: no such file or folder")
    if not cases and not cards:
        raise UserError(
            f"{path}: no train/validation/test .jsonl/.csv/.parquet files and no flashcards"
            ".jsonl/.json (the generative track's)"
        )
    checked = []
    if cases:
        check_cases = _case_checker(args)
        checked += [(f, check_cases(f)) for f in sorted(cases)]
    checked += [(f, _check_cards(f)) for f in sorted(cards)]
    failed = 0
    for file, (count, problems) in checked:
        for problem in problems:
            print(problem, file=sys.stderr)
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"{file}: {count}, {status}")
        failed += bool(problems)
    return 1 if failed else 0


def _case_checker(args: argparse.Namespace) -> Callable[[Path], tuple[str, list]]:
    """Checks case files against the label set training uses: the run config's `labels`
    (env and flags included), resolved once for all files."""
    from federimed.config import resolve
    from federimed.data.records import Columns, check_file

    labels = resolve(app_dir=args.app, run_config=args.run_config or "").run.label_list
    columns = Columns(text=args.text_column, label=args.label_column, id=args.id_column)

    def check(file: Path) -> tuple[str, list]:
        examples, problems = check_file(file, labels, columns)
        return f"{len(examples)} valid rows", problems

    return check


def _check_cards(file: Path) -> tuple[str, list]:
    from federimed.data.records import DataError, load_flashcards

    try:
        return f"{len(load_flashcards(file))} valid flashcards", []
    except DataError as error:
        return "0 valid flashcards", error.problems


# --- deployment -----------------------------------------------------------------------------


def cmd_certs(args: argparse.Namespace) -> int:
    from federimed.deploy.certs import ensure_certs

    names = args.hospital or _hospital_names(args.hospitals)
    report = ensure_certs(args.out, names, tuple(args.san), force=args.force)
    for path in report.created:
        print(f"created {path}")
    for path in report.kept:
        print(f"kept    {path} (valid; --force to replace)")
    return 0


def _exec(argv: list[str]) -> int:
    from federimed.deploy.flower import flower_env

    print("exec:", " ".join(argv), flush=True)
    env = flower_env()
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def cmd_superlink(args: argparse.Namespace) -> int:
    from federimed.deploy.flower import superlink_argv
    from federimed.settings import SuperLinkSettings

    return _exec(superlink_argv(SuperLinkSettings()))


def cmd_supernode(args: argparse.Namespace) -> int:
    from federimed.deploy.flower import supernode_argv
    from federimed.settings import SuperNodeSettings

    return _exec(supernode_argv(SuperNodeSettings()))


def cmd_superexec(args: argparse.Namespace) -> int:
    """Flower's SuperExec in this process, so that it starts ClientApps (or, for the
    consortium, ServerApps) and no other task type, each ClientApp in a clean room
    (federimed.deploy.site_runner) instead of plain `flwr-clientapp`."""
    from flwr.supercore.cli import flower_superexec

    from federimed.deploy import site_runner
    from federimed.deploy.flower import flower_env, superexec_argv, wait_for_listener
    from federimed.deploy.site_runner import use_site_clientapp
    from federimed.deploy.warm import WarmStarter, use_warm_starts
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


def cmd_gateway(args: argparse.Namespace) -> int:
    from federimed.deploy.gateway import gateway_argv
    from federimed.settings import GatewaySettings

    return _exec(gateway_argv(GatewaySettings()))


# --- what a hospital controls -----------------------------------------------------------------


def cmd_app_hash(args: argparse.Namespace) -> int:
    from federimed.config import find_app_dir
    from federimed.deploy.flower import app_hash

    print(app_hash(args.app_dir or find_app_dir()))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from federimed.policy import approve

    added = approve(args.policy, args.hash, note=args.note, site=args.site, ledger=args.ledger)
    print(f"{'approved' if added else 'already approved'}: {args.hash} in {args.policy}")
    return 0


def cmd_ledger_show(args: argparse.Namespace) -> int:
    from federimed.ledger import entries

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
    from federimed.ledger import LedgerError, verify

    try:
        count = verify(args.path, args.anchor)
    except LedgerError as error:
        print(f"ledger does not verify: {error}", file=sys.stderr)
        return 1
    anchored = f", and line {args.anchor.partition(':')[0]} is the anchor's" if args.anchor else ""
    print(f"{args.path}: {count} entries, hash chain intact{anchored}")
    return 0


def cmd_privacy_show(args: argparse.Namespace) -> int:
    from federimed.policy import load_policy
    from federimed.privacy import budget_report

    print(budget_report(load_policy(args.policy)))
    return 0


def cmd_ledger_anchor(args: argparse.Namespace) -> int:
    from federimed.ledger import LedgerError, anchor

    try:
        print(anchor(args.path))
    except LedgerError as error:
        print(f"ledger does not verify, so it gets no anchor: {error}", file=sys.stderr)
        return 1
    return 0


# The name of the connection `federimed enroll/submit` write into their private FLWR_HOME.
CONNECTION = "federimed"


def _flwr_home(args: argparse.Namespace) -> Path:
    from federimed.deploy.flower import write_flwr_home

    home = Path(args.flwr_home)
    write_flwr_home(home, CONNECTION, args.superlink, args.ca_cert)
    return home


def cmd_enroll(args: argparse.Namespace) -> int:
    from federimed.deploy.flower import enroll

    added = enroll(_flwr_home(args), CONNECTION, args.public_keys)
    for key in args.public_keys:
        print(f"{'enrolled' if key in added else 'already enrolled'}: {key}")
    return 0


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


def cmd_submit(args: argparse.Namespace) -> int:
    import subprocess

    from federimed.config import find_app_dir, resolve, to_toml_pairs
    from federimed.deploy.flower import COMPLETED, log_stream_argv, run_status, submit_run

    home, connection, deployment = _connection(args)
    run_config = args.run_config or ""
    if args.resume:
        run_config += f' resume-from="{args.resume}"'
    effective = resolve(app_dir=args.app, run_config=run_config, deployment=deployment)
    app = find_app_dir(args.app)
    run_id = submit_run(home, connection, app, to_toml_pairs(effective.overrides))
    print(f"submitted Flower run {run_id}", flush=True)
    if not args.stream:
        return 0
    argv, env = log_stream_argv(home, connection, run_id)
    subprocess.call(argv, env=env)
    status = run_status(home, connection, run_id).get("status", "unknown")
    if status != COMPLETED:
        print(f"error: Flower run {run_id} ended as {status}", file=sys.stderr)
        return 1
    print(f"Flower run {run_id} {status}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from federimed.data.records import Federation
    from federimed.deploy.local import LocalFederation

    out = args.out.resolve()
    data = args.data or _synthetic_data(out / "data", args.hospitals, args.seed)
    federation = Federation.from_folder(data)
    running = LocalFederation(
        workdir=out,
        certs=args.certs or out / "certs",
        hospitals=federation.hospitals,
        test_path=federation.test_path,
        netns_mode=args.netns,
        say=print,
        detached=True,
    ).start()
    state = running.state
    print(
        f"federation up: SuperLink https://{state.superlink} "
        f"(TLS: {state.tls}, node authentication: {state.node_auth}, {state.network})\n"
        f"  consortium (Control API, `federimed submit --out {args.out}`): {state.superlink}\n"
        f"  hospitals connect to the fleet gateway (Fleet API only): {state.gateway}, "
        f"CA {state.ca_cert}\n"
        + "".join(f"  {name}'s site policy: {path}\n" for name, path in state.site_policies.items())
        + "".join(f"  {name} at {address}\n" for name, address in state.hospitals.items())
        + f"stop it with: federimed down --out {args.out}"
    )
    return 0


def _synthetic_data(out: Path, hospitals: int, seed: int) -> Path:
    from federimed.data.synth import SynthConfig, generate, write_dataset

    if (out / "test.jsonl").is_file():
        found = len(list(out.glob("hospital-*")))
        print(f"using the synthetic data already in {out} ({found} hospitals)")
    else:
        write_dataset(generate(SynthConfig(hospitals=hospitals, seed=seed)), out)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    from federimed.deploy.local import RunningFederation

    report = RunningFederation.attach(args.out).status()
    if args.format == "json":
        print(json.dumps(report, indent=2))
        return 0
    print(f"SuperLink {report['superlink']} (consortium only)")
    print(f"fleet gateway {report['gateway']} (what hospitals reach; {report['network']})")
    for p in report["processes"]:
        state = "alive" if p["alive"] else "NOT RUNNING"
        who = p["hospital"] or p["role"]
        print(f"  {who:<14} pid {p['pid']:<8} {p['address']:<16} {p['netns'] or '-':<14} {state}")
    for run in report["runs"]:
        print(f"  run {run['run_id']}: {run['status']}, {run['rounds_completed']} round(s) done")
    return 0 if all(p["alive"] for p in report["processes"]) else 1


def cmd_down(args: argparse.Namespace) -> int:
    from federimed.deploy.local import RunningFederation

    running = RunningFederation.attach(args.out)
    running.stop()
    print(f"stopped {len(running.state.processes)} process(es) of the federation in {args.out}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    from federimed.deploy.local import RunningFederation

    running = RunningFederation.attach(args.out)
    record = running.restart(args.role, args.hospital)
    who = f"{args.role} of {args.hospital}" if args.hospital else args.role
    print(f"restarted the {who} (pid {record.pid}); log: {record.log}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from federimed.config import resolve
    from federimed.deploy.local import RunningFederation

    deployment = RunningFederation.attach(args.out).run_overrides() if args.out else {}
    effective = resolve(app_dir=args.app, run_config=args.run_config or "", deployment=deployment)
    print(effective.to_json() if args.format == "json" else effective.to_text())
    return 0


# --- training and inference -----------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from federimed.demo import DemoOptions, run_demo

    options = DemoOptions(
        out=args.out,
        hospitals=args.hospitals,
        data=args.data,
        certs=args.certs,
        cases_per_hospital=args.cases_per_hospital,
        baselines=not args.no_baselines,
        tuned=not args.no_tuned,
        app_dir=args.app,
        netns=args.netns,
        run_flags={
            "track": args.track,
            "num-server-rounds": args.rounds,
            "local-steps": args.local_steps,
            # --model names the track's model: the encoder, or the generative track's LM
            ("generator" if args.track == "generative" else "model"): args.model,
            "strategy": args.strategy,
            "seed": args.seed,
        },
        run_config=args.run_config or "",
    )
    run_demo(options)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from federimed.data.records import default_labels
    from federimed.model import load_for_inference, quiet_libraries, top_diagnoses

    quiet_libraries()
    model, tokenizer = load_for_inference(args.model)
    names = default_labels()
    for code, p in top_diagnoses(model, tokenizer, args.text, args.top_k):
        print(f"{p:6.1%}  {code:<6} {names.get(code, '')}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from federimed.decoder import GeneratorError, ask, load_answerer
    from federimed.model import quiet_libraries

    quiet_libraries()
    if not args.question.strip():
        raise UserError("ask: the question is empty")
    try:
        model, tokenizer = load_answerer(args.model)
    except GeneratorError as error:
        raise UserError(str(error)) from None
    ask(model, tokenizer, args.question, args.max_new_tokens,
        on_text=lambda text: print(text, end="", flush=True))  # fmt: skip
    print()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from federimed.settings import ServeSettings
    from federimed.webapp.access import AccessControl, TokenFileError, add_token, revoke_token
    from federimed.webapp.app import ServeLimits, load_app
    from federimed.webapp.served import LATEST, ModelFolderError

    settings = _with_flags(
        ServeSettings, args, "model", "runs", "host", "port", "max_chars", "max_new_tokens",
        "tokens", "auth",
    )  # fmt: skip
    if args.add_token or args.revoke_token:  # the operator's side: no web app started
        try:
            if args.revoke_token:
                gone = revoke_token(settings.tokens, args.revoke_token)
                print(f"{args.revoke_token}: {'revoked' if gone else 'had no token'} "
                      f"({settings.tokens})")  # fmt: skip
                return 0
            token = add_token(settings.tokens, args.add_token)
        except (TokenFileError, OSError) as error:
            raise UserError(f"--tokens {settings.tokens}: {error}") from None
        print(f"a new token for {args.add_token}, shown only now (its hash is in "
              f"{settings.tokens}; any earlier token of {args.add_token} no longer works):",
              file=sys.stderr)  # fmt: skip
        print(token, flush=True)
        return 0
    if settings.model is None and settings.runs is None:
        raise UserError("serve: give --model DIR (the model to query), --runs DIR, or both")
    if settings.runs is not None and not settings.runs.is_dir():
        raise UserError(f"--runs {settings.runs}: no such folder")
    if str(settings.model) == LATEST and settings.runs is None:
        raise UserError("--model latest needs --runs DIR: the runs it takes the newest model from")
    limits = ServeLimits(
        max_chars=settings.max_chars,
        max_new_tokens=settings.max_new_tokens,
        max_body_bytes=settings.max_body_bytes,
        max_generations=settings.max_generations,
        max_predictions=settings.max_predictions,
    )
    access = AccessControl.from_settings(settings)
    try:
        app = load_app(settings.model, settings.runs, limits, access)
    except ModelFolderError as error:
        raise UserError(str(error)) from None
    for name in ("federimed.serve", "federimed.audit"):  # uvicorn configures only its own
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(f"{name.split('.')[1]}: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
    print(
        f"FederiMed web app on http://{settings.host}:{settings.port}/ "
        f"(model: {settings.model or 'none'}, runs: {settings.runs or 'none'}, "
        f"{_serve_access(settings)})",
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        proxy_headers=False,  # only the trusted proxies' headers count (FEDERIMED_SERVE_*)
        server_header=False,
    )
    return 0


def _serve_access(settings) -> str:
    """How people sign in, said at start; on a loopback address the first start makes the
    tokens file with one token for the person who started it, printed once (as `make serve`
    after `make demo` needs): anywhere else the operator adds users with --add-token."""
    import getpass
    import ipaddress

    from federimed.webapp.access import TokenFileError, add_token

    if settings.auth == "none":
        return "auth none: anyone who reaches the port may use it"
    if settings.auth == "proxy-header":
        return (f"users from {settings.proxy_user_header} sent by {settings.trusted_proxies}, "
                f"tokens from {settings.tokens}")  # fmt: skip
    tokens = settings.tokens
    try:
        loopback = settings.host == "localhost" or ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = False
    if tokens.exists() or not loopback:
        if not tokens.exists():
            return (f"no tokens file yet at {tokens}: nobody can sign in until "
                    "`federimed serve --add-token NAME` makes one")  # fmt: skip
        return f"tokens from {tokens}"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    user = user if user and user[0].isalnum() else "operator"
    try:
        token = add_token(tokens, user)
    except (TokenFileError, OSError) as error:
        raise UserError(f"--tokens {tokens}: cannot create it: {error}") from None
    print(
        f"first start: {tokens} created (0600) with a token for {user}, shown only now; sign "
        f"in at http://{settings.host}:{settings.port}/login with it, or send it as "
        f"'Authorization: Bearer TOKEN':\n  {token}\n"
        f"(another user, or a new token: federimed serve --add-token NAME)",
        flush=True,
    )
    return f"tokens from {tokens}"


def cmd_exporter(args: argparse.Namespace) -> int:
    from federimed.deploy.site_exporter import serve
    from federimed.settings import ExporterSettings

    settings = _with_flags(ExporterSettings, args, "ledger", "host", "port")
    where = f"http://{settings.host}:{settings.port}/metrics"
    print(f"exporting {settings.ledger} on {where}", flush=True)
    serve(settings.ledger, settings.host, settings.port)
    return 0


def _with_flags(model, args: argparse.Namespace, *names: str):
    """A component's settings: its FEDERIMED_* variables, overridden by the flags given."""
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return model(**given)


# --- parser ---------------------------------------------------------------------------------


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


def build_parser() -> argparse.ArgumentParser:
    from federimed.runconfig import STRATEGIES, TRACKS

    parser = argparse.ArgumentParser(
        prog="federimed",
        description="Train clinical language models across hospitals without sharing records.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="make and check hospital data").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    synth = data.add_parser("synth", help="write synthetic hospitals and a common test set")
    synth.add_argument("--hospitals", type=_positive_int, default=3)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet label skew: smaller = more different hospitals",
    )
    synth.add_argument("--cases-per-hospital", type=_positive_int, default=300)
    from federimed.data.synth import STYLES

    synth.add_argument(
        "--held-out-style",
        choices=STYLES,
        help="the writing style no hospital uses, for test-unseen-style.jsonl "
        "(default: chosen by the seed)",
    )
    synth.add_argument(
        "--track",
        choices=TRACKS,
        default="classify",
        help="generative: also each hospital's flashcards (its cases as case -> diagnosis "
        "cards, what it knows about the conditions it has seen) and test-flashcards.jsonl",
    )
    synth.set_defaults(func=cmd_data_synth)
    validate = data.add_parser(
        "validate",
        help="check a data file or folder against the run config's labels; exit 1 if bad",
    )
    validate.add_argument("path", type=Path)
    _run_config_args(validate)
    validate.add_argument("--text-column", default="text")
    validate.add_argument("--label-column", default="label")
    validate.add_argument("--id-column", default="id")
    validate.add_argument(
        "--flashcards",
        action="store_true",
        help="the file is flashcards (MedAlpaca's format, JSON lines or a JSON list); files "
        "named flashcards*.jsonl/.json are recognised without it",
    )
    validate.set_defaults(func=cmd_data_validate)

    config = sub.add_parser("config", help="the run configuration").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    show = config.add_parser(
        "show",
        help="print the effective run config and where each value came from",
        description="Defaults come from the app's pyproject.toml [tool.flwr.app.config]; "
        "FEDERIMED_RUN_<KEY> environment variables override them (source 'env'), "
        "--run-config overrides both (source 'flag'); with --out, what that local "
        "federation sets for its runs comes between defaults and env (source 'deployment'). "
        f"Strategies: {', '.join(STRATEGIES)}.",
    )
    _run_config_args(show)
    _out_arg(show, required=False)
    show.add_argument("--format", choices=["text", "json"], default="text")
    show.set_defaults(func=cmd_config_show)

    certs = sub.add_parser("certs", help="CA, SuperLink certificate and hospital key pairs")
    certs.add_argument("--out", type=Path, default=Path("certs"))
    certs.add_argument("--hospitals", type=_positive_int, default=3)
    certs.add_argument("--hospital", action="append", help="a hospital name (repeatable)")
    certs.add_argument(
        "--san",
        action="append",
        default=[],
        help="extra name or IP the SuperLink is reached by (repeatable)",
    )
    certs.add_argument("--force", action="store_true", help="replace valid material too")
    certs.set_defaults(func=cmd_certs)

    for name, func, text in (
        ("superlink", cmd_superlink, "run the SuperLink (settings: FEDERIMED_SUPERLINK_*)"),
        ("supernode", cmd_supernode, "run a hospital's SuperNode (settings: FEDERIMED_NODE_*)"),
        ("superexec", cmd_superexec, "run an app runner (settings: FEDERIMED_SUPEREXEC_*)"),
        ("gateway", cmd_gateway, "run the fleet gateway (settings: FEDERIMED_GATEWAY_*)"),
    ):
        sub.add_parser(name, help=text).set_defaults(func=func)

    _site_parsers(sub)

    enroll = sub.add_parser("enroll", help="register hospital public keys with the SuperLink")
    _connection_args(enroll)
    enroll.add_argument("public_keys", type=Path, nargs="+")
    enroll.set_defaults(func=cmd_enroll)

    up = sub.add_parser(
        "up", help="start a local federation (SuperLink + SuperNodes) that keeps running"
    )
    _out_arg(up)
    up.add_argument("--hospitals", type=_positive_int, default=3, help="synthetic hospitals")
    up.add_argument("--data", type=Path, help="your own data folder (hospital-*/, test.jsonl)")
    up.add_argument("--certs", type=Path, help="certificates folder (default: OUT/certs)")
    up.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    _netns_arg(up)
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="processes and runs of a local federation")
    _out_arg(status)
    status.add_argument("--format", choices=["text", "json"], default="text")
    status.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="stop everything `federimed up` started")
    _out_arg(down)
    down.set_defaults(func=cmd_down)

    restart = sub.add_parser(
        "restart",
        help="stop one process of an `up` federation and start it again as `up` did",
        description="What a patched and rebooted node looks like: same command line, keys and "
        "state database. A restarted SuperLink keeps every enrolment and completed round, but "
        "Flower 1.42 does not reconnect a running ServerApp to it: that run fails after about "
        "60 s; continue it with `federimed submit --resume RUN_ID`.",
    )
    _out_arg(restart)
    restart.add_argument("role", choices=["superlink", "gateway", "supernode", "clientapp"])
    restart.add_argument("hospital", nargs="?", help="for supernode and clientapp: which one")
    restart.set_defaults(func=cmd_restart)

    submit = sub.add_parser(
        "submit",
        help="submit a training run with the flwr CLI",
        description="To a local federation (--out DIR) or to any SuperLink "
        "(--superlink HOST:PORT --ca-cert FILE).",
    )
    _out_arg(submit, required=False)
    _connection_args(submit, required=False)
    _run_config_args(submit)
    submit.add_argument("--stream", action="store_true", help="follow the run's logs")
    submit.add_argument(
        "--resume",
        metavar="RUN_ID",
        type=_run_id,
        help="continue a run that died: start from its last checkpoint and do the rounds it "
        "had left (pass the same --run-config; the ServerApp refuses one that differs)",
    )
    submit.set_defaults(func=cmd_submit)

    demo = sub.add_parser("demo", help="run a secured local federation + baselines + report")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo"),
        help="run folder: report, model, logs (default: %(default)s)",
    )
    demo.add_argument(
        "--hospitals",
        type=_positive_int,
        default=3,
        help="synthetic hospitals, one SuperNode each (default: %(default)s)",
    )
    demo.add_argument("--data", type=Path, help="your own data folder (hospital-*/, test.jsonl)")
    demo.add_argument("--certs", type=Path, default=Path("certs"))
    demo.add_argument("--cases-per-hospital", type=_positive_int, default=300)
    demo.add_argument(
        "--no-baselines",
        action="store_true",
        help="federated only: no local-only or centralized models to compare against",
    )
    demo.add_argument(
        "--no-tuned",
        action="store_true",
        help="only the equal-budget baselines, not each method again with its learning rate and "
        "length picked on its own validation data (minutes of CPU)",
    )
    _netns_arg(demo)
    # Run-config shortcuts: unset means the app's default (`federimed config show`).
    demo.add_argument("--rounds", type=_positive_int, help="run config num-server-rounds")
    demo.add_argument("--local-steps", type=_positive_int, help="run config local-steps")
    demo.add_argument(
        "--track",
        choices=TRACKS,
        help="run config track: classify (the encoder) or generative (a causal LM answering "
        "flashcards); default: the app's",
    )
    demo.add_argument(
        "--model",
        help="the track's model: run config model ('minilm', a HF id or a local folder) or, "
        "for --track generative, generator ('smollm2', 'gpt2', a HF id or a local folder)",
    )
    demo.add_argument("--strategy", choices=STRATEGIES, help="run config strategy")
    demo.add_argument("--seed", type=int, help="run config seed (also seeds the synthetic data)")
    _run_config_args(demo)
    demo.set_defaults(func=cmd_demo)

    predict = sub.add_parser("predict", help="top-k diagnoses for a case description")
    predict.add_argument("--model", type=Path, required=True)
    predict.add_argument("--top-k", type=_positive_int, default=3)
    predict.add_argument("text")
    predict.set_defaults(func=cmd_predict)

    ask = sub.add_parser(
        "ask", help="a generative run's model answers a question, printed as it is generated"
    )
    ask.add_argument("--model", type=Path, required=True, help="the run's final/ (or adapter/)")
    ask.add_argument("--max-new-tokens", type=_positive_int, default=64)
    ask.add_argument("question")
    ask.set_defaults(func=cmd_ask)

    serve = sub.add_parser(
        "serve",
        help="the web app: clinicians query the model, operators follow the runs",
        description="One web application: / (the clinician page: a case's top 5 diagnoses, or a "
        "generative model's answer as it is written, beside the model's provenance), /runs "
        "(the operator dashboard, following live runs through their per-round record), the "
        "JSON API (/api/predict, /api/ask, /api/runs, /healthz; its docs at /docs) and "
        "Prometheus metrics (/metrics). Signed in by default (a token per person; see "
        "docs/webapp-security.md). Case text is never logged or stored. Every option "
        "is also a FEDERIMED_SERVE_* variable (flags win).",
    )
    serve.add_argument(
        "--model",
        type=Path,
        help="a run's final/ folder or the demo's model/; 'latest': the newest completed run's "
        "model under --runs, followed as new runs complete",
    )
    serve.add_argument("--runs", type=Path, help="folder of run records, e.g. runs/ (read-only)")
    serve.add_argument(
        "--max-chars", type=_positive_int, help="longest case text or question (default 4000)"
    )
    serve.add_argument(
        "--max-new-tokens", type=_positive_int, help="longest generated answer (default 64)"
    )
    serve.add_argument(
        "--auth",
        choices=["token", "proxy-header", "none"],
        help="who may use it: 'token' (default: a token per person, Bearer header or the login "
        "page), 'proxy-header' (a single-sign-on proxy's user header, from "
        "FEDERIMED_SERVE_TRUSTED_PROXIES only), 'none' (anyone who reaches the port)",
    )
    serve.add_argument(
        "--tokens",
        type=Path,
        help="the users' tokens file, hashes only (default ~/.config/federimed/serve-tokens; "
        "on a loopback address the first start creates it with a token for you)",
    )
    users = serve.add_mutually_exclusive_group()
    users.add_argument(
        "--add-token",
        metavar="NAME",
        help="print a new token for NAME once, keep only its hash in the tokens file (made "
        "0600), and exit; NAME's earlier token stops working",
    )
    users.add_argument(
        "--revoke-token", metavar="NAME", help="remove NAME from the tokens file and exit"
    )
    _listen_args(serve, 8080)
    serve.set_defaults(func=cmd_serve)

    exporter = sub.add_parser(
        "exporter",
        help="a hospital's Prometheus metrics, read from its egress ledger",
        description="Serves /metrics for one hospital: replies that left by kind, bytes sent, "
        "training steps and examples behind them, the last training loss, tasks refused by "
        "code, and whether the ledger's hash chain verifies. It reads the ledger at each "
        "scrape and nothing else. Every option is also a FEDERIMED_EXPORTER_* variable.",
    )
    exporter.add_argument("--ledger", type=Path, help="the hospital's egress-ledger.jsonl")
    _listen_args(exporter, 9401)
    exporter.set_defaults(func=cmd_exporter)
    return parser


def _listen_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help=f"HTTP port (default {port})")


class UserError(Exception):
    """Something the user can fix; printed without a traceback."""


def _site_parsers(sub: argparse._SubParsersAction) -> None:
    """`app hash`, `approve`, `ledger show|verify`: the hospital's own controls."""
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


if __name__ == "__main__":
    sys.exit(main())
