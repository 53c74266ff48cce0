"""`federimed`: one command line for hospital IT, operators and researchers.

Errors a person can fix (bad data, bad settings, a missing file, a process that died) are
printed as one plain message naming what and where, with exit code 2; never a bare traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

EXAMPLES = """\
examples:
  federimed demo                                  # the whole thing: 3 hospitals, real Flower
  federimed data synth --hospitals 3 --out data   # synthetic hospitals + common test set
  federimed data validate data/hospital-1         # check a data folder before training
  federimed certs --out certs --hospitals 3       # CA, SuperLink cert, node keys
  federimed predict --model runs/demo/model "58M c/o crushing CP, ST elevation..."
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    return 0


def _labels_for(path: Path, explicit: Path | None) -> dict[str, str]:
    from federimed.data.records import default_labels, read_label_file

    if explicit:
        return read_label_file(explicit)
    for folder in (path if path.is_dir() else path.parent, *path.resolve().parents):
        if (folder / "labels.json").is_file():
            return read_label_file(folder / "labels.json")
    return default_labels()


def cmd_data_validate(args: argparse.Namespace) -> int:
    from federimed.data.records import SPLITS, SUFFIXES, Columns, check_file

    path: Path = args.path
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.stem in SPLITS)
    elif path.exists():
        files = [path]
    else:
        raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"{path}: no train/validation/test .jsonl/.csv/.parquet files")
    labels = _labels_for(path, args.labels)
    columns = Columns(text=args.text_column, label=args.label_column, id=args.id_column)
    failed = 0
    for file in files:
        examples, problems = check_file(file, labels, columns)
        for problem in problems:
            print(problem, file=sys.stderr)
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"{file}: {len(examples)} valid rows, {status}")
        failed += bool(problems)
    return 1 if failed else 0


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
    from federimed.deploy.flower import superexec_argv
    from federimed.settings import SuperExecSettings

    return _exec(superexec_argv(SuperExecSettings()))


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


def cmd_submit(args: argparse.Namespace) -> int:
    import subprocess

    from federimed.demo import find_app_dir
    from federimed.deploy.flower import COMPLETED, log_stream_argv, run_status, submit_run

    home = _flwr_home(args)
    run_id = submit_run(home, CONNECTION, find_app_dir(args.app), args.run_config or "")
    print(f"submitted Flower run {run_id}", flush=True)
    if not args.stream:
        return 0
    argv, env = log_stream_argv(home, CONNECTION, run_id)
    subprocess.call(argv, env=env)
    status = run_status(home, CONNECTION, run_id).get("status", "unknown")
    if status != COMPLETED:
        print(f"error: Flower run {run_id} ended as {status}", file=sys.stderr)
        return 1
    print(f"Flower run {run_id} {status}")
    return 0


# --- training and inference -----------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from federimed.demo import DemoOptions, run_demo
    from federimed.model import quiet_libraries

    quiet_libraries()
    options = DemoOptions(
        out=args.out,
        hospitals=args.hospitals,
        rounds=args.rounds,
        local_steps=args.local_steps,
        model=args.model,
        data=args.data,
        certs=args.certs,
        seed=args.seed,
        cases_per_hospital=args.cases_per_hospital,
        strategy=args.strategy,
        baselines=not args.no_baselines,
        app_dir=args.app,
        netns=args.netns,
    )
    run_demo(options)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from federimed.data.records import default_labels
    from federimed.model import load_for_inference, quiet_libraries

    quiet_libraries()
    model, tokenizer = load_for_inference(args.model)
    batch = tokenizer([args.text], truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        proba = torch.softmax(model(**batch).logits[0], dim=-1)
    names = default_labels()
    top = torch.topk(proba, k=min(args.top_k, proba.numel()))
    for p, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        code = model.config.id2label[index]
        print(f"{p:6.1%}  {code:<6} {names.get(code, '')}")
    return 0


# --- parser ---------------------------------------------------------------------------------


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    parser.add_argument("--ca-cert", type=Path, required=True, help="CA that signed it")
    parser.add_argument(
        "--flwr-home",
        default=".flwr-federimed",
        help="private Flower CLI config folder (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="federimed",
        description="Train clinical language models across hospitals without sharing records.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    synth.set_defaults(func=cmd_data_synth)
    validate = data.add_parser("validate", help="check a data file or folder; exit 1 if bad")
    validate.add_argument("path", type=Path)
    validate.add_argument("--labels", type=Path, help="labels.json (default: found or built-in)")
    validate.add_argument("--text-column", default="text")
    validate.add_argument("--label-column", default="label")
    validate.add_argument("--id-column", default="id")
    validate.set_defaults(func=cmd_data_validate)

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
    ):
        sub.add_parser(name, help=text).set_defaults(func=func)

    enroll = sub.add_parser("enroll", help="register hospital public keys with the SuperLink")
    _connection_args(enroll)
    enroll.add_argument("public_keys", type=Path, nargs="+")
    enroll.set_defaults(func=cmd_enroll)

    submit = sub.add_parser("submit", help="submit a training run with the flwr CLI")
    _connection_args(submit)
    submit.add_argument("--app", type=Path, help="Flower app folder (default: this package)")
    submit.add_argument("--run-config", help="overrides, e.g. 'num-server-rounds=3'")
    submit.add_argument("--stream", action="store_true", help="follow the run's logs")
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
    # The default size fits the 10-minute target on 2 cores (README, "How long things take").
    demo.add_argument(
        "--rounds", type=_positive_int, default=4, help="federated rounds (default: %(default)s)"
    )
    demo.add_argument(
        "--local-steps",
        type=_positive_int,
        default=15,
        help="optimizer steps per hospital per round (default: %(default)s)",
    )
    demo.add_argument("--model", default="minilm", help="'minilm', a HF id or a local folder")
    demo.add_argument("--data", type=Path, help="your own data folder (hospital-*/, test.jsonl)")
    demo.add_argument("--certs", type=Path, default=Path("certs"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cases-per-hospital", type=_positive_int, default=300)
    demo.add_argument(
        "--strategy",
        default="fedavg",
        choices=["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"],
    )
    demo.add_argument("--no-baselines", action="store_true")
    demo.add_argument(
        "--netns",
        choices=["auto", "on", "off"],
        default="auto",
        help="run each hospital in its own network namespace (needs root; "
        "auto: where the machine allows it)",
    )
    demo.add_argument("--app", type=Path, help="Flower app folder (default: this package)")
    demo.set_defaults(func=cmd_demo)

    predict = sub.add_parser("predict", help="top-k diagnoses for a case description")
    predict.add_argument("--model", type=Path, required=True)
    predict.add_argument("--top-k", type=_positive_int, default=3)
    predict.add_argument("text")
    predict.set_defaults(func=cmd_predict)
    return parser


class UserError(Exception):
    """Something the user can fix; printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from federimed.data.records import DataError
    from federimed.deploy.flower import DeploymentError
    from federimed.deploy.processes import ProcessDied

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; all processes were stopped", file=sys.stderr)
        return 130
    except ValidationError as error:
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
        print(f"error: {error}", file=sys.stderr)
        return 2


def _settings_problems(error: ValidationError) -> str:
    prefix = {
        "SuperLinkSettings": "FEDERIMED_SUPERLINK_",
        "SuperNodeSettings": "FEDERIMED_NODE_",
        "SuperExecSettings": "FEDERIMED_SUPEREXEC_",
    }.get(error.title, "FEDERIMED_")
    return "\n".join(
        f"  {prefix}{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
        for e in error.errors()
    )


if __name__ == "__main__":
    sys.exit(main())
