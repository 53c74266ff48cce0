"""8 bits a value on the wire (federimed/learning/wire.py): what the server sends, what the
hospital's guard sends back, and how the server reads it."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from federimed.consortium.checks import as_sent, decoded_update, record_bytes
from federimed.learning import wire

DEMO_VALUES = 184_736  # MiniLM with adapters in the top 2 layers, its pooler and 32-way head


def _weights(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(size) * rng.choice([0.001, 0.1, 1.0], size)).astype(np.float32)


def test_eight_bit_weights_are_within_half_a_step_of_their_block_scale():
    weights = _weights(3 * wire.BLOCK + 17)
    packed = wire.quantize(weights)
    assert packed.dtype == np.int8 and packed.size == weights.size + 4 * 4  # 4 blocks' scales
    back = wire.dequantize(packed)
    blocks = np.array_split(np.arange(weights.size), range(wire.BLOCK, weights.size, wire.BLOCK))
    for block in blocks:
        step = np.abs(weights[block]).max() / wire.LEVELS
        assert np.abs(back[block] - weights[block]).max() <= step / 2 * 1.0001


def test_a_block_of_zeros_stays_zero_and_nothing_divides_by_it():
    weights = np.zeros(wire.BLOCK + 5, dtype=np.float32)
    weights[-1] = 2.0
    back = wire.dequantize(wire.quantize(weights))
    assert np.isfinite(back).all() and not back[: wire.BLOCK].any() and back[-1] == 2.0


def test_the_demo_update_is_a_quarter_of_its_float32_size():
    """Issue 32's bound: at most 185,000 bytes per update each way, as Flower counts them."""
    float32 = ArrayRecord({wire.WIRE_ARRAY: Array(np.zeros(DEMO_VALUES, dtype=np.float32))})
    assert record_bytes(float32) == 738_944 + 128  # the array's npy header
    sent = as_sent(float32, "int8")
    update = wire.ErrorFeedback().encode(_weights(DEMO_VALUES), _weights(DEMO_VALUES, seed=1), 1)
    reply = ArrayRecord({name: Array(values) for name, values in update.items()})
    assert record_bytes(sent) == record_bytes(reply) == 184_956 <= 185_000


def test_error_feedback_sends_over_rounds_what_one_round_rounds_away():
    """What each round's 8 bits leave out is sent with the next: the sum of what was sent stays
    within one round's rounding of the sum of the true changes, however many rounds."""
    feedback, received = wire.ErrorFeedback(), _weights(5000)
    true_total, sent_total = np.zeros(5000), np.zeros(5000)
    for round_ in range(20):
        change = _weights(5000, seed=round_ + 1) * 0.01
        update = feedback.encode(received, received + change, round_ + 1)
        sent = wire.dequantize(update[wire.DELTA_ARRAY])
        true_total += change
        sent_total += sent
    last_step = np.abs(change + feedback.residuals[19]).max() / wire.LEVELS
    assert np.abs(sent_total - true_total).max() <= last_step
    without = sum(
        wire.dequantize(wire.quantize(_weights(5000, seed=r + 1) * 0.01)) for r in range(20)
    )
    assert np.abs(sent_total - true_total).sum() < np.abs(without - true_total).sum()


def test_the_server_adds_a_hospitals_8_bit_change_to_its_own_float32_model():
    model = _weights(10_000)
    record = ArrayRecord({wire.WIRE_ARRAY: Array(model)})
    sent = wire.decode({wire.WIRE_ARRAY: as_sent(record, "int8")[wire.WIRE_ARRAY].numpy()})
    trained = sent + _weights(10_000, seed=3) * 0.01  # the hospital trained from what it got
    update = wire.ErrorFeedback().encode(sent, trained, 1)
    reply = ArrayRecord({name: Array(values) for name, values in update.items()})
    decoded, problem = decoded_update(reply, record)
    assert problem is None
    got = decoded[wire.WIRE_ARRAY].numpy()
    # the change, at 8 bits, on the server's float32 model (not on the 8-bit copy it sent)
    assert np.abs(got - (model + (trained - sent))).max() <= np.abs(trained - sent).max() / 127


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"delta": np.zeros(100, dtype=np.float32)}, "must be int8, got float32"),
        ({"delta": np.zeros(3, dtype=np.int8)}, "no 8192-value blocks"),
        ({"delta": np.zeros(7, dtype=np.int8)}, "3 values for weights of 100"),
        ({"exchanged": np.zeros(50, dtype=np.float32)}, "50 values for weights of 100"),
        ({"weights": np.zeros(100, dtype=np.float32)}, "'weights' float32\\[100\\]"),
        ({"delta": np.zeros((10, 10), dtype=np.int8)}, "flat, got shape \\(10, 10\\)"),
    ],
)
def test_an_update_the_server_cannot_read_says_why(arrays, problem):
    reference = ArrayRecord({wire.WIRE_ARRAY: Array(np.zeros(100, dtype=np.float32))})
    reply = ArrayRecord({name: Array(values) for name, values in arrays.items()})
    decoded, found = decoded_update(reply, reference)
    assert decoded is None and found is not None
    assert found.startswith("unreadable update") and re.search(problem, found)


def test_scales_that_are_not_finite_are_refused():
    packed = wire.quantize(_weights(100))
    packed[-4:] = np.array([np.nan], dtype="<f4").view(np.int8)
    with pytest.raises(wire.WireError, match="negative or not finite"):
        wire.dequantize(packed)


def test_a_round_done_again_adds_the_rounding_of_the_round_before_it():
    """A resumed run redoes the round its server died in: the update carries what the round
    before it rounded away, not what the lost attempt did, as the uninterrupted run's does."""
    received = _weights(3000)
    changes = [_weights(3000, seed=s) * 0.01 for s in (1, 2, 3)]
    whole, resumed = wire.ErrorFeedback(), wire.ErrorFeedback()
    for round_, change in ((1, changes[0]), (2, changes[1])):
        whole.encode(received, received + change, round_)
        resumed.encode(received, received + change, round_)
    resumed.encode(received, received + _weights(3000, seed=9), 3)  # the attempt that was lost
    again = resumed.encode(received, received + changes[2], 3)
    assert np.array_equal(again["delta"], whole.encode(received, received + changes[2], 3)["delta"])
    assert sorted(resumed.residuals) == [2, 3]  # two rounds kept, no more


def test_a_bounded_update_stays_within_the_bound_as_the_server_reads_it_every_round():
    feedback, received = wire.ErrorFeedback(), np.zeros(20_000, dtype=np.float32)
    for round_ in range(1, 6):
        trained = received + _weights(20_000, seed=round_)  # far beyond the bound
        update = feedback.encode(received, trained, round_, max_norm=0.5)
        sent = wire.apply_update(update, received)
        assert 0.49 < np.linalg.norm(sent) <= 0.5
        # only the rounding waits for the next round, not what the clip took away
        assert np.linalg.norm(feedback.residuals[round_]) < 0.01
