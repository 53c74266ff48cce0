"""The consortium operators' commands: certificates, the SuperLink and its gateway, enrolment,
a local federation (up, status, down, restart, submit) and the web app."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from federimed.cli.common import (
    CONNECTION,
    UserError,
    _connection,
    _connection_args,
    _exec,
    _flwr_home,
    _hospital_names,
    _listen_args,
    _netns_arg,
    _out_arg,
    _positive_int,
    _run_config_args,
    _run_id,
    _with_flags,
    settings_flag,
)


def cmd_certs(args: argparse.Namespace) -> int:
    from federimed.deploy.certs import ensure_certs

    names = args.hospital or _hospital_names(args.hospitals)
    report = ensure_certs(args.out, names, tuple(args.san), force=args.force)
    for path in report.created:
        print(f"created {path}")
    for path in report.kept:
        print(f"kept    {path} (valid; --force to replace)")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    from federimed.deploy.flower import superlink_argv
    from federimed.settings import SuperLinkSettings

    return _exec(superlink_argv(SuperLinkSettings()))


def cmd_gateway(args: argparse.Namespace) -> int:
    from federimed.deploy.gateway import gateway_argv
    from federimed.settings import GatewaySettings

    return _exec(gateway_argv(GatewaySettings()))


def cmd_enroll(args: argparse.Namespace) -> int:
    from federimed.deploy.flower import enroll

    added = enroll(_flwr_home(args), CONNECTION, args.public_keys)
    for key in args.public_keys:
        print(f"{'enrolled' if key in added else 'already enrolled'}: {key}")
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    import faulthandler
    import logging
    import signal

    import uvicorn

    from federimed.settings import ServeSettings
    from federimed.webapp.access import AccessControl, TokenFileError, add_token, revoke_token
    from federimed.webapp.app import ServeLimits, load_app
    from federimed.webapp.served import LATEST, ModelFolderError

    settings = _with_flags(ServeSettings, args)
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
    # `kill -USR1` (`docker kill -s USR1 webapp`) prints every thread's stack to stderr: where
    # a web app that stopped answering waits, without stopping it
    # (to file descriptor 2, the process's stderr: sys.stderr may have no file behind it)
    faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
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


def register(sub: argparse._SubParsersAction) -> None:
    """Consortium operators: certificates, SuperLink, gateway, a local federation, web app."""
    from federimed.settings import ServeSettings

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
        ("gateway", cmd_gateway, "run the fleet gateway (settings: FEDERIMED_GATEWAY_*)"),
    ):
        sub.add_parser(name, help=text).set_defaults(func=func)

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

    serve = sub.add_parser(
        "serve",
        help="the web app: clinicians query the model, operators follow the runs",
        description="One web application: / (the clinician page: a case's top 5 diagnoses, or a "
        "generative model's answer as it is written, beside the model's provenance), /runs "
        "(the operator dashboard, following live runs through their per-round record), the "
        "JSON API (/api/predict, /api/ask, /api/runs, /healthz; its docs at /docs) and "
        "Prometheus metrics (/metrics). Signed in by default (a token per person; see "
        "docs/webapp-security.md). Case text is never logged or stored. Each setting's flag "
        "names its FEDERIMED_SERVE_* variable; a flag given wins over the variable.",
    )
    for name in ("model", "runs", "auth", "tokens"):
        settings_flag(serve, ServeSettings, name)
    for name in ("max_chars", "max_new_tokens"):
        settings_flag(serve, ServeSettings, name, type=_positive_int)
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
    _listen_args(serve, ServeSettings)
    serve.set_defaults(func=cmd_serve)
