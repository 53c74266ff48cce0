"""What a report shows: the methods it compares and each track's measures.

Apart from :mod:`federimed.report` (which draws with matplotlib) so that the web app's run
pages read them without loading a plotting library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Equal budget (the federation's steps) first, then each method tuned on its own validation data.
METHODS = (
    "federated", "local", "centralized",
    "federated_tuned", "local_tuned", "centralized_tuned",
)  # fmt: skip
TUNED = {"federated_tuned": "federated", "local_tuned": "local", "centralized_tuned": "centralized"}


def method_name(method: str) -> str:
    return f"{TUNED[method]} (tuned)" if method in TUNED else method


@dataclass(frozen=True)
class Measures:
    """Which scores a track's report shows (metric keys and how to name them)."""

    headline: str  # per model on the common test set
    headline_name: str
    second: str
    second_name: str
    unseen: str  # the headline on the conditions a hospital never saw
    validation: str  # what each hospital reports of the incoming model, per round
    validation_name: str
    fractions: bool  # the validation measure is a fraction (0-1)
    # every score the report's per-method table shows: (key, column name)
    columns: tuple[tuple[str, str], ...] = ()
    unseen_style: str | None = None  # the headline on notes in a style no hospital writes


MEASURES = {
    "classify": Measures(
        "accuracy", "test accuracy", "macro_f1", "macro-F1", "unseen_accuracy",
        "val_accuracy", "accuracy", fractions=True,
        columns=(
            ("accuracy", "top-1"), ("top3_accuracy", "top-3"), ("ece", "ECE"),
            ("macro_f1", "macro-F1"), ("unseen_accuracy", "top-1 on unseen conditions"),
            ("unseen_style_accuracy", "top-1 in the unseen style"),
            ("unseen_style_top3_accuracy", "top-3 in the unseen style"),
        ),
        unseen_style="unseen_style_accuracy",
    ),
    "generative": Measures(
        "exact_match", "diagnosis exact match", "token_f1", "token-F1", "unseen_exact_match",
        "val_loss", "loss per answer token", fractions=False,
        columns=(
            ("exact_match", "diagnosis exact match"), ("token_f1", "token-F1"),
            ("perplexity", "perplexity"),
            ("unseen_exact_match", "exact match on unseen conditions"),
            ("unseen_token_f1", "token-F1 on unseen conditions"),
            ("unseen_perplexity", "perplexity on unseen conditions"),
        ),
    ),
}  # fmt: skip


def measures(report: dict[str, Any]) -> Measures:
    return MEASURES[report["setup"].get("track", "classify")]


def methods_in(report: dict[str, Any]) -> list[str]:
    """The methods this report has results for (``--no-baselines``: federated only)."""
    first: dict[str, Any] = next(iter(report["hospitals"].values()), {})
    return [method for method in METHODS if method in first]
