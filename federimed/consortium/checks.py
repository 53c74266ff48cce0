"""What the consortium checks in every reply before it is aggregated, and how big it is.

Hospitals are named by the node Flower authenticated (the name it was enrolled under), never
by what a reply says about itself; updates that are non-finite, mis-shaped or too large are
dropped; 8-bit changes are decoded against the model sent; replies whose metric keys differ
(a hospital without validation data) are cut to the common keys.
"""

from __future__ import annotations

import math
import re

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from federimed.learning import wire

# The metric replies are weighted by when Flower averages them (training.train reports it).
WEIGHT_KEY = "num_examples"
# An enrolled name is used in paths (audit files) and reports only if it is this plain.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def hospital_name(node_id: int, enrolled: str) -> str:
    """The name the node was enrolled under, or ``node-<id>`` when it is not a safe name."""
    return enrolled if SAFE_NAME.match(enrolled) else f"node-{node_id}"


def update_problem(update: ArrayRecord, reference: ArrayRecord, max_norm: float) -> str | None:
    """Why ``update`` must not be aggregated into ``reference`` (the global model), or None.

    Keys, shapes and dtypes must match, every value must be finite, and with ``max_norm`` > 0
    the L2 norm of the change must stay within it: one broken or hostile hospital must not
    be able to wreck the global model for everyone.
    """
    if set(update) != set(reference):
        missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    for name, expected in reference.items():
        got = update[name]
        if list(got.shape) != list(expected.shape) or got.dtype != expected.dtype:
            wanted = f"{expected.dtype}{list(expected.shape)}"
            return f"{name}: {got.dtype}{list(got.shape)}, expected {wanted}"
        try:
            values = got.numpy().astype(np.float64)
        except ValueError as error:
            return f"{name}: unreadable array ({error})"
        if not np.isfinite(values).all():
            return f"{name}: non-finite values"
        squared += float(np.sum((values - expected.numpy()) ** 2))
    norm = math.sqrt(squared)
    if max_norm and norm > max_norm:
        return f"update norm {norm:.4g} above the bound {max_norm:g}"
    return None


def as_sent(arrays: ArrayRecord, precision: wire.Precision) -> ArrayRecord:
    """The global model (float32, in the wire's layout) as it is sent at ``precision``."""
    if precision == "float32" or set(arrays) != {wire.WIRE_ARRAY}:
        return arrays
    encoded = wire.encode(arrays[wire.WIRE_ARRAY].numpy(), precision)
    return ArrayRecord({name: Array(values) for name, values in encoded.items()})


def decoded_update(update: ArrayRecord, sent: ArrayRecord) -> tuple[ArrayRecord | None, str | None]:
    """The weights a hospital's reply stands for (its 8-bit change added to the float32 model
    ``sent`` to it, or its float32 weights), or why it cannot be read."""
    if set(sent) != {wire.WIRE_ARRAY}:
        return update, None  # not in the wire's layout: update_problem names what differs
    try:
        arrays = {name: array.numpy() for name, array in update.items()}
        weights = wire.apply_update(arrays, sent[wire.WIRE_ARRAY].numpy())
    except ValueError as error:
        return None, f"unreadable update ({error})"
    return ArrayRecord({wire.WIRE_ARRAY: Array(weights)}), None


def metrics_problem(content: RecordDict) -> str | None:
    """Why a reply's metrics cannot be averaged, or None."""
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            return f"metric {key}: non-finite value"
    weight = metrics.get(WEIGHT_KEY)
    if isinstance(weight, list) or weight is None or weight <= 0:
        return f"metric {WEIGHT_KEY}: missing or not positive ({weight!r})"
    return None


def keep_common_metrics(replies: list[Message]) -> None:
    """Cut every reply's metrics to the keys all of them have.

    Flower refuses to aggregate replies whose metric keys differ; a hospital without
    validation data (no ``val_*`` keys) must not fail everyone's round. Each hospital's full
    metrics are already in the round record.
    """
    records = [next(iter(r.content.metric_records.values())) for r in replies]
    if not records:
        return
    common = set.intersection(*(set(record) for record in records))
    for record in records:
        for key in set(record) - common:
            del record[key]


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord as it travels (serialized array bytes)."""
    return sum(len(array.data) for array in record.values())
