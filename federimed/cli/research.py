"""The researchers' commands: data (synth, validate), the run config, the demo, and asking a
trained model (predict, ask)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from federimed.cli.common import (
    UserError,
    _netns_arg,
    _out_arg,
    _positive_int,
    _run_config_args,
)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from federimed.data.synth import SynthConfig, generate, write_dataset
    from federimed.tracks import track_for

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
    for line in track_for(args.track).write_data(dataset, args.out):
        print(line)
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


def cmd_config_show(args: argparse.Namespace) -> int:
    from federimed.config import resolve
    from federimed.deploy.local import RunningFederation

    deployment = RunningFederation.attach(args.out).run_overrides() if args.out else {}
    effective = resolve(app_dir=args.app, run_config=args.run_config or "", deployment=deployment)
    print(effective.to_json() if args.format == "json" else effective.to_text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from federimed.research.demo import DemoOptions, run_demo
    from federimed.tracks import track_for

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
            track_for(args.track or "classify").model_key: args.model,
            "strategy": args.strategy,
            "seed": args.seed,
        },
        run_config=args.run_config or "",
    )
    run_demo(options)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from federimed.data.records import default_labels
    from federimed.learning.model import load_for_inference, quiet_libraries, top_diagnoses

    quiet_libraries()
    model, tokenizer = load_for_inference(args.model)
    names = default_labels()
    for code, p in top_diagnoses(model, tokenizer, args.text, args.top_k):
        print(f"{p:6.1%}  {code:<6} {names.get(code, '')}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from federimed.data.records import default_labels
    from federimed.learning.model import quiet_libraries
    from federimed.tracks.generative.decoder import GeneratorError, ask, load_answerer

    quiet_libraries()
    if not args.question.strip():
        raise UserError("ask: the question is empty")
    try:
        model, tokenizer = load_answerer(args.model)
    except GeneratorError as error:
        raise UserError(str(error)) from None
    ask(model, tokenizer, args.question, args.max_new_tokens,
        on_text=lambda text: print(text, end="", flush=True),
        choices=list(default_labels().values()))  # fmt: skip
    print()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Researchers: make and check data, see the run config, run the demo, ask a model."""
    from federimed.runconfig import STRATEGIES
    from federimed.tracks import names as track_names

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
        choices=track_names(),
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
        choices=track_names(),
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
