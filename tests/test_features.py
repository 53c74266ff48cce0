"""The frozen layers' output, computed once and replayed: same answers, kept where the hospital
says, never trusted when the model changed under it."""

from __future__ import annotations

import stat

import numpy as np
import pytest
import torch
from conftest import make_run

from federimed.data.records import load_hospital
from federimed.learning import features
from federimed.learning.batching import Encoded, encode, pick_device
from federimed.learning.features import first_adapted_layer, with_features
from federimed.learning.model import (
    build_classifier,
    load_for_inference,
    load_tokenizer,
    save_model,
)
from federimed.learning.training import evaluate, predict_proba, train
from federimed.runconfig import TrainSettings
from federimed.settings import RuntimeSettings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cases(synth_data, tiny_model):
    run = make_run(model=tiny_model, max_length=64, lora_layers=1)
    data = load_hospital(synth_data / "hospital-1", run.label_list)
    return run, encode(data.train[:80], load_tokenizer(tiny_model), run.label_list, 64)


def _model(run):
    return build_classifier(run.model, run.label_list, run.lora, seed=run.seed)


def test_adapters_sit_in_the_top_layers_only(cases):
    run, _ = cases
    assert first_adapted_layer(_model(run)) == 1
    everywhere = make_run(model=run.model, lora_layers=0)
    assert first_adapted_layer(_model(everywhere)) == 0


def test_replayed_features_give_the_same_predictions_as_the_full_model(cases):
    run, data = cases
    model = _model(run)
    cached = with_features(model, data, CPU, run.model)
    assert cached.features is not None and cached.features.dtype == torch.float16
    assert cached.features.shape[:2] == (len(data), int(data.attention_mask.sum(1).max()))
    full, replayed = predict_proba(model, data, CPU), predict_proba(model, cached, CPU)
    assert np.abs(full - replayed).max() < 2e-3
    assert (full.argmax(1) == replayed.argmax(1)).mean() > 0.97
    # The frozen layers are back in place afterwards.
    assert np.array_equal(predict_proba(model, data, CPU), full)


def test_training_on_replayed_features_learns_and_only_moves_the_adapter(cases):
    run, data = cases
    model = _model(run)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    cached = with_features(model, data, CPU, run.model)
    before = evaluate(model, cached, CPU)["loss"]
    train(model, cached, TrainSettings(steps=30, batch_size=16, learning_rate=5e-3), CPU)
    assert evaluate(model, data, CPU)["loss"] < before - 0.2  # judged by the full model
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_pooled_splits_keep_their_features_row_for_row(cases):
    run, data = cases
    model = _model(run)
    halves = [
        with_features(model, Encoded(data.input_ids[s], data.attention_mask[s], data.labels[s]),
                      CPU, run.model)
        for s in (slice(0, 40), slice(40, 80))
    ]  # fmt: skip
    pooled = Encoded.concat(halves)
    assert np.abs(predict_proba(model, pooled, CPU) - predict_proba(model, data, CPU)).max() < 2e-3


def test_the_cache_folder_is_private_reused_and_refreshed_when_the_model_changes(
    cases, synth_data, tmp_path, monkeypatch
):
    run, _ = cases
    # Cases of their own lengths, the probe rows (the first two) the longest and the shortest:
    # computed in different batches, of different widths.
    examples = load_hospital(synth_data / "hospital-1", run.label_list).train[:80]
    data = encode(examples, load_tokenizer(run.model), run.label_list, 256)
    lengths = data.attention_mask.sum(dim=1)
    longest, shortest = int(lengths.argmax()), int(lengths.argmin())
    assert lengths[longest] > lengths[shortest] + 10
    rest = [i for i in range(len(data)) if i not in (longest, shortest)]
    order = torch.tensor([longest, shortest, *rest])
    data = Encoded(data.input_ids[order], data.attention_mask[order], data.labels[order])
    model = _model(run)
    folder = tmp_path / "cache"
    first = with_features(model, data, CPU, run.model, folder)
    (path,) = folder.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    computed = []
    original = features.frozen_features
    monkeypatch.setattr(
        features,
        "frozen_features",
        lambda m, d, device: computed.append(len(d)) or original(m, d, device),
    )
    again = with_features(model, data, CPU, run.model, folder)
    assert torch.equal(again.features, first.features)
    assert computed == [features._PROBE_ROWS]  # only the probe that checks the copy

    with torch.no_grad():  # the same name, other weights below the adapter: not reused
        model.base_model.model.bert.embeddings.word_embeddings.weight.mul_(2)
    computed.clear()
    with_features(model, data, CPU, run.model, folder)
    assert computed == [features._PROBE_ROWS, len(data)]

    path.write_bytes(b"not a tensor file")
    computed.clear()
    assert with_features(model, data, CPU, run.model, folder).features is not None
    assert computed == [len(data)]


def test_float32_and_bf16_features_are_kept_apart(cases, tmp_path, monkeypatch):
    """A hospital that changes FEDERIMED_PRECISION (or its CPU) gets features of the precision
    it trains in, not a copy that happens to pass the probe's tolerance."""
    from federimed.learning import batching

    run, data = cases
    model = _model(run)
    for hardware in (False, True):
        monkeypatch.setattr(batching, "native_cpu_bf16", lambda hardware=hardware: hardware)
        pick_device(RuntimeSettings(device="cpu"))
        with_features(model, data, CPU, run.model, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("hardware", [False, True])
def test_a_stored_copy_is_trusted_to_its_precisions_rounding_and_no_further(
    cases, monkeypatch, hardware
):
    """bf16 products in batches of another shape move SmolLM2's tokens by about 1% (the
    probe recomputes two rows alone): within bf16's bound, beyond float32's; a copy off by
    half a token's norm is another model's in both."""
    from federimed.learning import batching

    run, data = cases
    model = _model(run)
    monkeypatch.setattr(batching, "native_cpu_bf16", lambda: hardware)
    pick_device(RuntimeSettings(device="cpu"))
    stored = features.frozen_features(model, data, CPU)

    def off_by(size: float) -> torch.Tensor:
        noise = torch.randn(stored.shape, generator=torch.Generator().manual_seed(0))
        scale = stored.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
        return (stored.float() + size * scale * noise).half()

    assert features._still_matches(model, data, stored, CPU)
    assert features._still_matches(model, data, off_by(0.02), CPU) is hardware
    assert not features._still_matches(model, data, off_by(0.5), CPU)


def test_a_model_adapted_in_every_layer_is_left_as_it_is(cases, tmp_path):
    run, data = cases
    everywhere = _model(make_run(model=run.model, lora_layers=0))
    out = with_features(everywhere, data, CPU, run.model, tmp_path)
    assert out.features is None and not any(tmp_path.iterdir())
    cached = with_features(_model(run), data, CPU, run.model)
    with pytest.raises(ValueError, match="bottom 1 layer"):
        predict_proba(everywhere, cached, CPU)  # its layer 0 is adapted: no replay into it


def test_a_model_loaded_for_inference_scores_from_the_same_features(cases, tmp_path):
    run, data = cases
    model = _model(run)
    train(model, data, TrainSettings(steps=5, batch_size=16, learning_rate=5e-3), CPU)
    save_model(model, load_tokenizer(run.model), tmp_path / "model", run.model)
    loaded, _ = load_for_inference(tmp_path / "model" / "adapter")  # a merged one cannot tell
    cached = with_features(_model(run), data, CPU, run.model)
    assert np.abs(predict_proba(loaded, cached, CPU) - predict_proba(model, data, CPU)).max() < 2e-3


def test_a_merged_model_uses_the_features_only_where_its_weights_are_the_base_models(
    cases, tmp_path
):
    run, data = cases
    base = _model(run)
    cached = with_features(base, data, CPU, run.model)
    for lora_layers, keeps in ((1, True), (0, False)):
        model = _model(make_run(model=run.model, lora_layers=lora_layers))
        train(model, data, TrainSettings(steps=5, batch_size=16, learning_rate=5e-2), CPU)
        save_model(model, load_tokenizer(run.model), tmp_path / str(lora_layers), run.model)
        merged, _ = load_for_inference(tmp_path / str(lora_layers))
        assert features.keeps_frozen_layers(merged, base, cached.frozen_layers) is keeps
    # The top-layer model, merged, scores the same from the features as computed whole.
    merged, _ = load_for_inference(tmp_path / "1")
    whole = predict_proba(merged, data, CPU)
    assert np.abs(predict_proba(merged, cached, CPU) - whole).max() < 2e-3
