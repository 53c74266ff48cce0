"""Record-level DP: the accountant against published values, DP-SGD's clipping and noise, and
the hospital's budget as its guard enforces and ledgers it (no processes; the e2e run is in
tests/test_e2e.py)."""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from federimed.cli import main
from federimed.hospital import ledger, privacy
from federimed.hospital.guard import SiteGuard
from federimed.hospital.policy import load_policy
from federimed.hospital.privacy import Mechanism, noise_for_epsilon, spent_by_run
from federimed.learning.batching import Encoded, batch_tensors
from federimed.learning.dpsgd import add_noise, clipped_gradient_sum
from federimed.learning.training import train
from federimed.runconfig import TrainSettings

# --- the accountant -------------------------------------------------------------------------


def test_poisson_sampled_gaussian_matches_dp_accountings_published_rdp():
    """dp-accounting's own test (rdp_privacy_accountant_test.py,
    test_compute_rdp_poisson_sampled_gaussian): q=0.01, σ=2.5, 50 steps, its RDP at five
    orders.  Our ε from the same event at those orders must be the ε of that curve."""
    from dp_accounting.rdp import compute_epsilon

    orders = (1.5, 2.5, 5.0, 50.0, 100.0)
    published = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02]
    expected, _ = compute_epsilon(orders, published, 1e-5)
    ours = privacy._epsilon(2.5, 0.01, 50, 1e-5, orders)
    assert ours == pytest.approx(expected, rel=1e-3)


def test_the_gaussian_noise_published_for_epsilon_one():
    """dp-accounting's test_compute_epsilon_delta_gaussian: σ=4.530877117 with no sampling,
    one step, is (1, 1e-6)-DP (our coarser orders give at most a little more)."""
    epsilon = Mechanism(4.530877117, 1.0, 1).epsilon(1, 1e-6)
    assert 1.0 <= epsilon < 1.03


def test_epsilon_grows_with_rounds_and_noise_buys_it_back():
    mechanism = Mechanism.for_hospital(1.0, batch_size=16, cases=255, steps=15)
    assert mechanism.sample_rate == pytest.approx(16 / 255)
    assert mechanism.epsilon(0, 1e-5) == 0.0
    curve = [mechanism.epsilon(rounds, 1e-5) for rounds in (1, 3, 6)]
    assert curve == sorted(curve) and curve[0] > 0
    assert Mechanism(0.0, 0.1, 15).epsilon(1, 1e-5) == math.inf
    sigma = noise_for_epsilon(8.0, 16 / 255, 90, 1e-5)
    assert privacy._epsilon(sigma, 16 / 255, 90, 1e-5) <= 8.0
    assert privacy._epsilon(sigma - 0.02, 16 / 255, 90, 1e-5) > 8.0  # the smallest such σ


# --- DP-SGD: clipping and noise ---------------------------------------------------------------


class _BagOfWords(torch.nn.Module):
    """The smallest model with the transformers interface train() uses: logits from ids."""

    def __init__(self, vocab: int = 50, labels: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 8)
        self.embed.weight.requires_grad_(False)
        self.head = torch.nn.Linear(8, labels)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = (self.embed(input_ids) * attention_mask[..., None]).mean(dim=1)
        logits = self.head(hidden)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def _data(cases: int = 40) -> Encoded:
    generator = torch.Generator().manual_seed(1)
    return Encoded(
        input_ids=torch.randint(0, 50, (cases, 6), generator=generator),
        attention_mask=torch.ones(cases, 6, dtype=torch.long),
        labels=torch.randint(0, 4, (cases,), generator=generator),
    )


def _forward(model, data: Encoded):
    def forward(rows):
        batch = batch_tensors(data, rows, torch.device("cpu"))
        labels = batch.pop("labels")
        return model(**batch).logits, labels

    return forward


def _trained(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_each_cases_gradient_is_clipped_before_it_is_summed():
    model, data = _BagOfWords(), _data()
    params = _trained(model)
    clipped_gradient_sum(model, params, _forward(model, data), np.arange(8), 1e-3)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
    assert float(norm) <= 8 * 1e-3 + 1e-9  # each of the 8 cases contributes at most C
    assert float(norm) > 1e-3  # and they were summed, not averaged into one


@pytest.mark.parametrize("clip", [1e-3, 1e6])  # every case clipped / none
def test_one_batched_pass_gives_the_per_case_gradients_a_loop_gives(tiny_model, clip):
    """The linear-layer hooks (LoRA, pooler, classifier of a real BERT) against one forward
    and backward per case: the same clipped sums."""
    from conftest import make_run

    from federimed.learning import dpsgd
    from federimed.learning.batching import encode
    from federimed.learning.model import build_classifier, load_tokenizer

    run = make_run(model=tiny_model, max_length=32)
    model = build_classifier(tiny_model, run.label_list, run.lora, seed=0)
    model.train()
    tokenizer = load_tokenizer(tiny_model)
    cases = [
        SimpleNamespace(text=f"fever and cough day {i}" * (1 + i % 3), label=run.label_list[i % 5])
        for i in range(6)
    ]
    data = encode(cases, tokenizer, run.label_list, 32)
    params = _trained(model)
    assert dpsgd._LinearTaps(model, params).complete
    rows = np.arange(6)
    hooked = clipped_gradient_sum(model, params, _forward(model, data), rows, clip)
    batched = [p.grad.clone() for p in params]
    for param in params:
        param.grad = torch.zeros_like(param)
    looped = dpsgd._loop(params, _forward(model, data), rows, clip)
    assert hooked == pytest.approx(looped, rel=1e-4)
    for one, other in zip(batched, [p.grad for p in params], strict=True):
        assert torch.allclose(one, other, rtol=1e-3, atol=1e-7)


def test_the_noise_has_the_scale_the_accountant_assumes():
    """σ·C on the sum, then the mean over the expected batch: std σ·C/B per coordinate."""
    params = [torch.nn.Parameter(torch.zeros(200, 200))]
    params[0].grad = torch.zeros(200, 200)
    add_noise(params, 2.0, 1.0, 16, torch.Generator().manual_seed(0))
    assert float(params[0].grad.std()) == pytest.approx(2.0 * 1.0 / 16, rel=0.02)


def test_same_seed_dp_on_and_off_give_different_updates_of_the_expected_scale():
    def update(noise: float) -> torch.Tensor:
        model = _BagOfWords()
        before = model.head.weight.detach().clone()
        settings = TrainSettings(
            steps=3, batch_size=8, learning_rate=0.01, noise_multiplier=noise, seed=3
        )
        train(model, _data(), settings, torch.device("cpu"))
        return model.head.weight.detach() - before

    plain, noisy, again = update(0.0), update(1.0), update(1.0)
    assert torch.equal(noisy, again)  # the noise is seeded: a run can be repeated
    assert not torch.allclose(plain, noisy)
    # AdamW moves each weight by about the learning rate per step, noise or not
    assert 0.2 * 0.03 < float(noisy.abs().mean()) <= 0.03 + 1e-6


# --- the hospital's budget, at its guard ---------------------------------------------------------

BUNDLE = b"approved bundle"


@pytest.fixture
def site(tmp_path, monkeypatch, synth_data):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"site: hospital-1\nledger: ledger.jsonl\napproved_apps:\n"
        f"  - sha256: {hashlib.sha256(BUNDLE).hexdigest()}\n"
        "privacy:\n  epsilon_per_run: 8.0\n  lifetime_epsilon: 6.0\n  max_grad_norm: 1.0\n"
    )
    monkeypatch.setenv("FEDERIMED_SITE_POLICY", str(policy))
    config = {"batch-size": 16, "local-steps": 15, "num-server-rounds": 3}
    config |= {"dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0}
    monkeypatch.setattr(
        "federimed.hospital.guard.get_fused_config_from_fab",
        lambda fab, run: config | run.override_config,
    )
    return SiteGuard("hospital-1", synth_data / "hospital-1"), policy


def _run(run_id: int = 7, **config):
    fab = SimpleNamespace(content=BUNDLE)
    run = SimpleNamespace(
        run_id=run_id,
        fab_hash=hashlib.sha256(BUNDLE).hexdigest(),
        primary_task_type="flwr-serverapp",
        override_config=config,
    )
    return run, fab


def _train_round(guard: SiteGuard, run_id: int = 7, **config):
    """One training task through the guard, the app replying with what it received."""
    from flwr.app import ArrayRecord, MetricRecord
    from test_site import _reply, _task

    task = _task(run_id=run_id)
    refusal = guard.admit(task, *_run(run_id, **config))
    if refusal is not None:
        return refusal
    guard.received(task.metadata.message_id, task)
    arrays = ArrayRecord(dict(task.content["arrays"].items()))
    metrics = MetricRecord({"num_examples": 170, "train_loss": 1.5})
    return guard.screen(_reply(task, arrays=arrays, metrics=metrics))


def test_a_run_over_the_per_run_budget_is_refused_before_training_naming_the_figures(site):
    guard, policy = site
    refusal = _train_round(guard, **{"dp-noise-multiplier": 0.3})
    assert "code PRIVACY_BUDGET" in refusal.error.reason
    assert "over privacy.epsilon_per_run=8" in refusal.error.reason
    assert "σ=0.3" in refusal.error.reason and "15 steps x 3 rounds" in refusal.error.reason
    assert spent_by_run(load_policy(policy).ledger) == {}  # nothing spent, the refusal ledgered
    assert "PRIVACY_BUDGET" in load_policy(policy).ledger.read_text()


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ({"dp-noise-multiplier": 0.0}, "PRIVACY_BUDGET"),  # no noise: ε is infinite
        ({"dp-max-grad-norm": 5.0}, "PRIVACY_REFUSED"),
        ({"dp-noise-multiplier": "lots"}, "PRIVACY_REFUSED"),
    ],
)
def test_a_consortium_that_wants_less_noise_gets_a_refusal(site, config, code):
    guard, _ = site
    assert f"code {code}" in _train_round(guard, **config).error.reason


def test_epsilon_per_reply_sums_to_what_privacy_show_reports(site, capsys):
    guard, policy = site
    replies = [_train_round(guard) for _ in range(3)]
    assert all(not reply.has_error() for reply in replies)
    assert all("train_loss" not in reply.content["metrics"] for reply in replies)  # held back
    lines = [e for e in ledger.entries(load_policy(policy).ledger)]
    spent = [entry["epsilon"] for _, entry in lines]
    assert spent[0] > 0 and all(e > 0 for e in spent)
    final = lines[-1][1]["epsilon_run"]
    assert sum(spent) == pytest.approx(final)
    assert final == pytest.approx(Mechanism.for_hospital(1.0, 16, 170, 15).epsilon(3, 1e-5))
    assert replies[-1].content["node"]["epsilon"] == pytest.approx(final)
    assert main(["privacy", "show", "--policy", str(policy)]) == 0
    shown = capsys.readouterr().out
    assert f"run 7: ε {final:.3f}; {8 - final:.3f} left of 8" in shown
    assert f"all runs: ε {final:.3f}; {6 - final:.3f} left of 6" in shown


def test_the_lifetime_budget_spans_runs(site):
    guard, _ = site
    for _ in range(3):
        assert not _train_round(guard, run_id=1).has_error()
    # run 1 spent about 3.8 of 6; a second run planning the same 3 rounds would pass 6
    refusal = _train_round(guard, run_id=2)
    assert "code PRIVACY_BUDGET" in refusal.error.reason
    assert "of privacy.lifetime_epsilon=6 is spent already" in refusal.error.reason
