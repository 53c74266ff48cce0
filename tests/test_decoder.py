"""The generative track's pieces: flashcards drawn from the consortium, prompts through the chat
template, the loss on the answer only, greedy answers and their scores (tiny GPT-2)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import client_train_reply, make_run, plant_marker

from federimed.data.conditions import BY_CODE
from federimed.data.flashcards import KNOWLEDGE, from_cases, knowledge_cards, write_flashcards
from federimed.data.records import DIAGNOSIS_KIND, Flashcard, load_flashcards
from federimed.data.synth import SynthConfig, generate
from federimed.learning.model import WIRE_ARRAY, exchanged_state, from_wire, to_wire
from federimed.learning.training import train
from federimed.runconfig import TrainSettings
from federimed.tracks.generative.decoder import (
    IGNORE,
    ask,
    build_generator,
    encode_cards,
    generate_answers,
    load_answerer,
    load_generator_tokenizer,
    normalize,
    prompt_ids,
    score_answers,
    token_f1,
)
from federimed.tracks.generative.task import training_cards

CARDS = [
    Flashcard("What is the key investigation in gout?", "joint aspirate: urate crystals"),
    Flashcard("Crushing chest pain and ST elevation: diagnosis?", "Acute myocardial infarction",
              "Answer this question truthfully", DIAGNOSIS_KIND, "I21"),
]  # fmt: skip


@pytest.fixture(scope="module")
def consortium():
    return generate(SynthConfig(hospitals=3, seed=1, cases_per_hospital=200))


def test_each_hospital_has_cards_only_for_conditions_it_has_seen(consortium):
    cards = from_cases(consortium, test_cases_per_condition=2)
    for hospital, source in zip(cards.hospitals, consortium.hospitals, strict=True):
        assert hospital.unseen == source.unseen and hospital.unseen
        assert not {c.code for c in hospital.train} & set(hospital.unseen)
        diagnosis = [c for c in hospital.train if c.kind == DIAGNOSIS_KIND]
        assert len(diagnosis) == len(source.train)
        assert {c.kind for c in hospital.train} == {DIAGNOSIS_KIND, *KNOWLEDGE}
    test_codes = {c.code for c in cards.test}
    assert test_codes == set(consortium.labels)  # the unseen conditions are tested too
    per_condition = [c.code for c in cards.test if c.kind == DIAGNOSIS_KIND]
    assert max(per_condition.count(code) for code in test_codes) == 2
    knowledge = [c for c in cards.test if c.kind != DIAGNOSIS_KIND]
    assert sorted(c.code for c in knowledge) == sorted(consortium.labels)  # one per condition
    assert {c.kind for c in knowledge} == set(KNOWLEDGE)  # every kind, in turn
    trained = {c.question for h in cards.hospitals for c in h.train + h.validation}
    assert not trained & {c.question for c in cards.test}  # no test question seen in training
    mimic = next(c for c in knowledge_cards(["I21"]) if c.kind == "mimic")
    assert mimic.answer == BY_CODE[BY_CODE["I21"].mimics[0]].name


def test_written_flashcards_load_back_with_their_kind_and_code(consortium, tmp_path):
    cards = from_cases(consortium)
    write_flashcards(cards, tmp_path)
    first = cards.hospitals[0]
    assert load_flashcards(tmp_path / first.name / "flashcards.jsonl") == first.train
    assert load_flashcards(tmp_path / "test-flashcards.jsonl") == cards.test


def test_a_kind_that_is_not_text_is_named_by_line(tmp_path):
    from federimed.data.records import DataError

    path = tmp_path / "cards.jsonl"
    path.write_text('{"input": "q", "output": "a"}\n{"input": "q", "output": "a", "kind": 3}\n')
    with pytest.raises(DataError, match=r"cards.jsonl:2: field 'kind' is not text"):
        load_flashcards(path)


def test_the_loss_falls_on_the_answer_and_its_end_only(tiny_gpt2):
    tokenizer = load_generator_tokenizer(tiny_gpt2)
    encoded = encode_cards(CARDS, tokenizer, max_length=64)
    for row, card in enumerate(CARDS):
        length = int(encoded.attention_mask[row].sum())
        labels = encoded.labels[row, :length]
        answer = labels[labels != IGNORE].tolist()
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]).strip() == card.answer
        prompt = prompt_ids(tokenizer, card.question, card.instruction)
        assert encoded.input_ids[row, : len(prompt)].tolist() == prompt
        assert (encoded.labels[row, length:] == IGNORE).all()  # padding


def test_a_long_question_is_cut_to_fit_and_the_answer_kept(tiny_gpt2):
    tokenizer = load_generator_tokenizer(tiny_gpt2)
    long = Flashcard("chest pain " * 200, "Acute myocardial infarction")
    encoded = encode_cards([long], tokenizer, max_length=48)
    assert encoded.input_ids.shape[1] <= 48
    answer = encoded.labels[0][encoded.labels[0] != IGNORE].tolist()[:-1]
    assert tokenizer.decode(answer).strip() == long.answer
    text = tokenizer.decode(encoded.input_ids[0])
    assert text.startswith("Question: chest pain") and "Answer:" in text  # the template kept


def test_only_the_adapter_on_the_layers_linear_maps_trains_travels_and_the_loss_goes_down(
    tiny_gpt2,
):
    run = make_run()
    model = build_generator(tiny_gpt2, run.lora, seed=0)
    state = exchanged_state(model)
    assert state and all("lora_" in name and ".h." in name for name in state)
    adapted = {name.split(".lora_")[0].split(".h.")[1].split(".", 1)[1] for name in state}
    assert adapted == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}  # not lm_head
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in state.values()) == trainable
    assert from_wire(model, to_wire(state)).keys() == state.keys()

    tokenizer = load_generator_tokenizer(tiny_gpt2)
    data = encode_cards(CARDS, tokenizer, max_length=64)
    settings = TrainSettings(steps=30, batch_size=2, learning_rate=0.02, seed=0)
    losses: list[float] = []
    train(model, data, settings, torch.device("cpu"), on_step=lambda _, loss: losses.append(loss))
    # A random 64-wide GPT-2 starts at ln(50257) = 10.8 nats; the adapter alone moves it.
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.25, losses


def test_greedy_answers_stop_at_the_cap(tiny_gpt2):
    tokenizer = load_generator_tokenizer(tiny_gpt2)
    model = build_generator(tiny_gpt2, make_run().lora)
    answers = generate_answers(
        model, tokenizer, CARDS, torch.device("cpu"), max_new_tokens=5, max_length=64
    )
    assert len(answers) == len(CARDS)
    assert all(len(tokenizer(a)["input_ids"]) <= 6 for a in answers)


def test_scores_normalise_like_squad_and_split_unseen_conditions():
    assert normalize("The Acute  myocardial infarction.") == "acute myocardial infarction"
    # 3 of 4 words shared each way ("the" dropped): precision = recall = F1 = 0.75
    assert token_f1("urate crystals in the joint", "joint aspirate: urate crystals") == 0.75
    assert token_f1("", "") == 1.0 and token_f1("x", "y") == 0.0
    scores = score_answers(CARDS, ["urate crystals", "acute myocardial infarction."], {"I21"})
    assert scores["exact_match"] == 1.0
    picked = score_answers(CARDS, None, {"I21"}, picks=[None, "gout"])  # no answers generated
    assert picked == {
        "num_examples": 2.0, "choice_accuracy": 0.0,
        "unseen_num_examples": 1.0, "unseen_choice_accuracy": 0.0,
    }  # fmt: skip
    assert scores["unseen_exact_match"] == 1.0 and "unseen_token_f1" not in scores
    assert 0 < scores["token_f1"] < 1 and scores["num_examples"] == 2
    # per card: summed loss over its answer tokens, and their count
    losses = (np.array([2.0, 3.0]), np.array([2, 1]))
    scored = score_answers(CARDS, ["x", "y"], {"I21"}, losses)
    assert scored["perplexity"] == pytest.approx(math.exp(5.0 / 3))
    assert scored["unseen_perplexity"] == pytest.approx(math.exp(3.0))  # the I21 card's only


def test_per_card_answer_losses_add_up_to_the_answer_loss(tiny_gpt2):
    from federimed.tracks.generative.decoder import answer_loss, answer_token_losses

    tokenizer = load_generator_tokenizer(tiny_gpt2)
    model = build_generator(tiny_gpt2, make_run().lora)
    data = encode_cards(CARDS * 9, tokenizer, 64)  # over one batch of 16
    sums, counts = answer_token_losses(model, data, torch.device("cpu"))
    assert len(sums) == 18 and (counts > 0).all()
    assert sums.sum() / counts.sum() == pytest.approx(answer_loss(model, data, torch.device("cpu")))


def test_a_generative_reply_is_the_adapter_only_and_carries_no_card_text(
    tiny_gpt2, consortium, tmp_path, monkeypatch
):
    """The ClientApp on the generative track: a marker planted in every question and answer
    of the hospital's cards is nowhere in what it sends."""
    import json

    from flwr.app import ArrayRecord

    from federimed.hospital.policy import approve

    marker = "OKAPI-MARKER-91d2"
    write_flashcards(from_cases(consortium), tmp_path / "data")
    hospital = tmp_path / "data" / "hospital-1"
    plant_marker(hospital, marker)
    policy = tmp_path / "site" / "policy.yaml"
    approve(policy, "0" * 64, site="hospital-1")
    monkeypatch.setenv("FEDERIMED_SITE_POLICY", str(policy))
    run = make_run(track="generative", generator=tiny_gpt2, local_steps=4, max_length=96)
    model = build_generator(tiny_gpt2, run.lora, seed=run.seed)
    initial = ArrayRecord(to_wire(exchanged_state(model)))

    reply = client_train_reply(run.to_flower(), hospital, initial)
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == [WIRE_ARRAY]
    assert all("lora_" in name for name in from_wire(model, arrays.to_torch_state_dict()))
    assert arrays[WIRE_ARRAY].numpy().size == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert marker.encode() not in arrays[WIRE_ARRAY].data
    scalars = json.dumps({k: dict(v) for k, v in reply.content.items() if k != "arrays"})
    assert marker not in scalars
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {
        "val_loss", "train_loss", "num_examples", "startup_seconds", "load_seconds",
        "compute_seconds",
    }  # fmt: skip
    own = load_flashcards(hospital / "flashcards.jsonl")  # and the run's public cards
    assert metrics["num_examples"] == len(training_cards(run, own)) > len(own)


def test_the_server_scores_a_generative_round_and_saves_an_adapter_peft_loads(
    tiny_gpt2, consortium, tmp_path
):
    from flwr.app import ArrayRecord
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from federimed.consortium.global_model import GlobalGenerator
    from federimed.consortium.run import ServerRun
    from federimed.runrecord import Scores

    write_flashcards(from_cases(consortium, test_cases_per_condition=1), tmp_path / "data")
    run = make_run(
        track="generative",
        generator=tiny_gpt2,
        max_length=96,
        max_new_tokens=4,
        test_path=str(tmp_path / "data" / "test-flashcards.jsonl"),
        output_dir=str(tmp_path / "flower"),
    )
    server = ServerRun(run, 3)
    model = server.global_model
    assert isinstance(model, GlobalGenerator)
    sent = exchanged_state(model.model)
    model.load(1, ArrayRecord(to_wire(sent)))
    # a round on the way: multiple choice and perplexity, no greedy answers
    on_the_way = model.score(run.num_server_rounds - 1)
    assert set(on_the_way) == {"choice_accuracy", "perplexity", "num_examples"}
    scores = Scores(**model.score(run.num_server_rounds))
    assert scores.choice_accuracy == on_the_way["choice_accuracy"]
    assert scores.exact_match == 0.0 and 0 <= scores.token_f1 < 0.5  # an untrained tiny model
    assert scores.perplexity > 1000 and scores.accuracy is None
    assert scores.num_examples == len(load_flashcards(tmp_path / "data" / "test-flashcards.jsonl"))
    assert 0 <= scores.choice_accuracy <= 0.25  # 32 diagnosis cards, 32 names: chance is 1/32
    assert scores.describe().startswith("test multiple-choice accuracy ")
    assert "exact match 0.0%, token-F1" in scores.describe()
    assert set(scores.model_dump()) == {
        "choice_accuracy",
        "exact_match",
        "token_f1",
        "perplexity",
        "num_examples",
    }

    final = model.save_final()
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2), final / "adapter"
    )
    assert all(torch.equal(exchanged_state(loaded)[k], sent[k]) for k in sent)


def test_ask_prints_the_answer_and_names_a_folder_that_is_no_generative_model(
    tiny_gpt2, tiny_model, tmp_path, capsys
):
    from federimed.cli import main
    from federimed.learning.model import build_classifier

    model = build_generator(tiny_gpt2, make_run().lora)
    model.save_pretrained(tmp_path / "final" / "adapter")
    load_generator_tokenizer(tiny_gpt2).save_pretrained(tmp_path / "final" / "adapter")
    question = "What is the key investigation in gout?"
    assert main(["ask", "--model", str(tmp_path / "final"), "--max-new-tokens", "3", question]) == 0
    printed = capsys.readouterr().out
    expected = ask(*load_answerer(tmp_path / "final"), question, max_new_tokens=3)
    assert printed.strip() == expected and expected  # streamed, then the same text in full

    assert main(["ask", "--model", str(tmp_path), question]) == 2
    assert "not a generative model folder" in capsys.readouterr().err
    build_classifier(tiny_model, ["A", "B"], make_run().lora).save_pretrained(tmp_path / "enc")
    assert main(["ask", "--model", str(tmp_path / "enc"), question]) == 2
    assert "not a causal LM's" in capsys.readouterr().err
    assert main(["ask", "--model", str(tmp_path / "final"), "  "]) == 2
    assert "the question is empty" in capsys.readouterr().err

    long_question = "Which findings matter here? " * 300  # beyond the model's 512 positions
    assert main(["ask", "--model", str(tmp_path / "final"), "--max-new-tokens", "3",
                 long_question]) == 0  # fmt: skip
    capsys.readouterr()
    config_file = tmp_path / "final" / "adapter" / "adapter_config.json"
    config_file.write_text("{not json")
    assert main(["ask", "--model", str(tmp_path / "final"), question]) == 2
    assert f"{config_file}: not valid JSON" in capsys.readouterr().err


def test_ask_prompts_as_the_model_was_trained(tiny_gpt2):
    """With the cards' instruction: SmolLM2's template otherwise puts its own system prompt
    ("You are a helpful AI assistant named SmolLM") where training had MedAlpaca's."""
    from federimed.data.records import INSTRUCTION

    model = build_generator(tiny_gpt2, make_run().lora)
    tokenizer = load_generator_tokenizer(tiny_gpt2)
    question = "What is the key investigation in gout?"
    trained = prompt_ids(tokenizer, question, INSTRUCTION)
    seen = []
    original = model.generate

    def generate(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return original(**kwargs)

    model.generate = generate
    ask(model, tokenizer, question, max_new_tokens=2)
    assert seen == [trained]


def test_a_model_trained_elsewhere_finds_its_base_model_through_its_provenance(tiny_gpt2, tmp_path):
    """peft records the trainer's own path of the base model (a container's cache): on another
    machine the run's provenance names the generator instead."""
    import json

    from federimed.tracks.generative.decoder import GeneratorError

    adapter = tmp_path / "final" / "adapter"
    build_generator(tiny_gpt2, make_run().lora).save_pretrained(adapter)
    load_generator_tokenizer(tiny_gpt2).save_pretrained(adapter)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "/opt/federimed/elsewhere/smollm2"
    config_file.write_text(json.dumps(config))
    with pytest.raises(GeneratorError, match=r"not on this machine, and no provenance\.json"):
        load_answerer(tmp_path / "final")
    (tmp_path / "final" / "provenance.json").write_text(json.dumps({
        "run_id": 5, "finished": "2026-11-30T00:00:00+00:00", "status": "completed",
        "track": "generative", "base_model": tiny_gpt2, "rounds_completed": 1,
        "hospitals": {}, "final_test": None,
    }))  # fmt: skip
    model, _ = load_answerer(tmp_path / "final")
    assert model.get_base_model().config.n_layer == 2


def test_the_answer_loss_computed_at_answer_positions_only_equals_the_full_one(tiny_gpt2):
    from federimed.tracks.generative.decoder import answer_loss

    model = build_generator(tiny_gpt2, make_run().lora)
    data = encode_cards(CARDS, load_generator_tokenizer(tiny_gpt2), max_length=64)
    with torch.no_grad():
        logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    full = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), data.labels[:, 1:], ignore_index=IGNORE
    )
    assert answer_loss(model, data, torch.device("cpu")) == pytest.approx(float(full), rel=1e-5)


def test_hospitals_cards_pool_for_the_centralized_baseline_whatever_their_lengths(tiny_gpt2):
    from federimed.learning.batching import Encoded

    tokenizer = load_generator_tokenizer(tiny_gpt2)
    short, long = encode_cards(CARDS[:1], tokenizer, 64), encode_cards(CARDS, tokenizer, 64)
    assert short.input_ids.shape[1] < long.input_ids.shape[1]
    pooled = Encoded.concat([short, long])
    assert pooled.input_ids.shape == (3, long.input_ids.shape[1])
    assert torch.equal(
        pooled.labels[0][pooled.labels[0] != IGNORE], short.labels[0][short.labels[0] != IGNORE]
    )
    assert int(pooled.attention_mask[0].sum()) == int(short.attention_mask[0].sum())


def test_gradient_checkpointing_trains_to_the_same_weights(tiny_gpt2):
    """FEDERIMED_GRADIENT_CHECKPOINTING trades compute for memory, never the result."""
    tokenizer = load_generator_tokenizer(tiny_gpt2)
    data = encode_cards(CARDS, tokenizer, max_length=64)
    trained = []
    for checkpointing in (False, True):
        model = build_generator(tiny_gpt2, make_run().lora, seed=0, checkpointing=checkpointing)
        settings = TrainSettings(steps=3, batch_size=2, learning_rate=0.02, seed=0)
        train(model, data, settings, torch.device("cpu"))
        trained.append(exchanged_state(model))
    plain, recomputed = trained
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)
    assert any(plain[k].abs().sum() > 0 for k in plain if "lora_B" in k)  # it did train


def test_the_prepared_gpu_check_times_the_decoder_on_the_cpu(tiny_gpt2):
    """bench/gpu_check.py is run on a machine with a GPU, rarely: its decoder part must not rot
    here (the CPU timing, on the tiny GPT-2)."""
    spec = importlib.util.spec_from_file_location(
        "gpu_check", Path(__file__).parents[1] / "bench" / "gpu_check.py"
    )
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    timings, failures = gpu_check.decoder_checks(tiny_gpt2, steps=8, cpu_only=True)
    assert failures == []
    (cpu,) = timings
    assert cpu["device"] == "cpu" and cpu["steps"] == 4
    assert cpu["train_tokens_per_second"] > 0 and cpu["answer_tokens_per_second"] > 0
    assert cpu["gpu_memory_peak_mib"] == 0.0


def test_data_validate_checks_flashcards_and_a_hospital_takes_medalpacas_json_list(
    consortium, tmp_path, capsys
):
    """MedAlpaca ships its flashcards as one JSON list: saved as a hospital's flashcards.json
    it trains as is; `federimed data validate` names each bad card's line and field."""
    import json

    from federimed.cli import main
    from federimed.data.records import load_hospital_cards

    cards = from_cases(consortium)
    write_flashcards(cards, tmp_path / "data")
    assert main(["data", "validate", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert f"{len(cards.test)} valid flashcards, OK" in out
    assert out.count("valid flashcards, OK") == 1 + 2 * len(cards.hospitals)

    hospital = tmp_path / "medalpaca"
    hospital.mkdir()
    medalpaca = [{"input": "What causes gout?", "output": "Urate crystals",
                  "instruction": "Answer this question truthfully"}] * 3  # fmt: skip
    (hospital / "flashcards.json").write_text(json.dumps(medalpaca, indent=2))
    train, validation = load_hospital_cards(hospital)
    assert [c.answer for c in train] == ["Urate crystals"] * 3 and validation == []

    mine = tmp_path / "my-cards.jsonl"
    mine.write_text('{"input": "q", "output": "a"}\n{"input": "q", "output": ""}\n')
    assert main(["data", "validate", "--flashcards", str(mine)]) == 1
    assert f"{mine}:2: missing or empty 'output'" in capsys.readouterr().err


def test_each_choice_is_scored_as_the_whole_answer_with_the_prompt_computed_once(tiny_gpt2):
    """The cached prompt gives each choice the log-likelihood the full sequence gives it."""
    from federimed.tracks.generative.decoder import _plain, choice_log_likelihoods

    tokenizer = load_generator_tokenizer(tiny_gpt2)
    model = build_generator(tiny_gpt2, make_run().lora).eval()
    choices = ["Gout", "Acute myocardial infarction", "Pulmonary embolism"]
    scored = choice_log_likelihoods(model, tokenizer, CARDS, choices, torch.device("cpu"), 128)
    assert scored.shape == (2, 3)
    lead = " " if _plain(tokenizer) else ""
    for row, card in enumerate(CARDS):
        prompt = prompt_ids(tokenizer, card.question, card.instruction)
        for column, choice in enumerate(choices):
            answer = tokenizer(lead + choice, add_special_tokens=False)["input_ids"]
            answer.append(tokenizer.eos_token_id)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            steps = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
            expected = steps.gather(1, torch.tensor(answer)[:, None]).sum()
            assert scored[row, column] == pytest.approx(float(expected), abs=1e-4)


def test_the_multiple_choice_accuracy_counts_diagnosis_cards_overall_and_unseen():
    from federimed.tracks.generative.task import condition_choices

    picks = [None, "Acute myocardial infarction"]
    scores = score_answers(CARDS, ["x", "a heart attack"], {"I21"}, picks=picks)
    assert scores["choice_accuracy"] == 1.0 and scores["unseen_choice_accuracy"] == 1.0
    assert scores["exact_match"] == 0.0
    wrong = score_answers(CARDS, ["x", "y"], {"I21"}, picks=[None, "Gout"])
    assert wrong["choice_accuracy"] == 0.0
    # the choices: the run's conditions by their catalogue names, then any other diagnosis given
    run = make_run(labels="I21,K35")
    other = Flashcard("Q?", "Made-up syndrome", "", DIAGNOSIS_KIND, "X99")
    choices = condition_choices(run, [*CARDS, other])
    assert choices == [BY_CODE["I21"].name, BY_CODE["K35"].name, "Made-up syndrome"]


def test_a_diagnosis_question_is_answered_with_the_likeliest_condition_then_free_text(tiny_gpt2):
    from federimed.tracks.generative.decoder import ranked_choices

    model = build_generator(tiny_gpt2, make_run().lora).eval()
    tokenizer = load_generator_tokenizer(tiny_gpt2)
    choices = ["Gout", "Acute myocardial infarction", "Pulmonary embolism"]
    question = "What is the most likely diagnosis for this patient?\n\n58M crushing chest pain"
    ranked = ranked_choices(model, tokenizer, question, choices, 128)
    assert sorted(name for name, _ in ranked) == sorted(choices)
    assert sum(share for _, share in ranked) == pytest.approx(1.0)
    assert [share for _, share in ranked] == sorted((s for _, s in ranked), reverse=True)
    pieces: list[str] = []
    answer = ask(model, tokenizer, question, 3, on_text=pieces.append, choices=choices)
    best, share = ranked[0]
    first_line = f"{best} (the likeliest of 3 conditions, {share:.0%})"
    assert answer.startswith(first_line + "\nFree text: ")
    assert "".join(pieces).startswith(first_line)
    # any other question, or no conditions to choose from: the free text alone
    other = ask(model, tokenizer, "What is the key investigation in gout?", 3, choices=choices)
    plain = ask(model, tokenizer, question, 3)
    assert "likeliest" not in other and "likeliest" not in plain


def test_public_cards_name_no_condition_in_their_question_and_a_hospital_gets_each_once():
    from federimed.data.flashcards import public_cards
    from federimed.tracks.generative.task import training_cards

    assert public_cards(["I21", "K35"], 0) == []
    cards = public_cards(["I21", "K35"], 4, seed=3)
    diagnoses = [card for card in cards if card.kind == DIAGNOSIS_KIND]
    assert len(diagnoses) == 8 and {card.code for card in diagnoses} == {"I21", "K35"}
    assert all(BY_CODE[card.code].name not in card.question for card in diagnoses)
    assert all(card.answer == BY_CODE[card.code].name for card in diagnoses)
    assert {card.kind for card in cards} == {DIAGNOSIS_KIND, *KNOWLEDGE}
    assert public_cards(["I21", "K35"], 4, seed=3) == cards  # every hospital draws the same
    run = make_run(labels="I21,K35", textbook_cases=4, seed=3)
    own = [*CARDS, *knowledge_cards(["I21"])]  # it already holds the public I21 facts
    trained = training_cards(run, own)
    assert trained[: len(own)] == own and len(trained) == len(own) + len(cards) - len(own[2:])
    assert len({(c.question, c.answer) for c in trained}) == len(trained)


def test_frozen_weights_are_cast_once_for_a_pass_and_put_back(tiny_gpt2, monkeypatch):
    """In bf16, the frozen linear maps hold bf16 copies while a scoring pass runs: the same
    logits as autocast casting them per call, the adapter in float32, the tied output layer
    tied again afterwards."""
    from federimed.learning import batching
    from federimed.settings import RuntimeSettings

    monkeypatch.setattr(batching, "native_cpu_bf16", lambda: True)
    device = batching.pick_device(RuntimeSettings(device="cpu"))
    model = build_generator(tiny_gpt2, make_run().lora).eval()
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    frozen_map = model.base_model.model.transformer.h[0].mlp.c_fc  # a Conv1D: left as it is
    head = model.base_model.model.lm_head
    before = {name: p for name, p in model.named_parameters()}
    with torch.no_grad(), batching.autocast(device):
        per_call = model(input_ids=ids).logits
    with torch.no_grad(), batching.frozen_weights_cast(model, device):
        assert head.weight.dtype == torch.bfloat16 and frozen_map.weight.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        with batching.autocast(device):
            once = model(input_ids=ids).logits
    assert torch.equal(once, per_call)
    assert all(p is before[name] for name, p in model.named_parameters())  # not copies
    assert head.weight is model.base_model.model.transformer.wte.weight


def test_the_final_outputs_are_read_back_for_the_same_cards_only(tmp_path):
    from federimed.tracks.generative.task import Outputs

    outputs = Outputs(
        ["urate crystals", "gout"], (np.array([2.0, 3.0]), np.array([2, 1])), [None, "Gout"]
    )
    path = tmp_path / "test-outputs.json"
    outputs.save(path, CARDS)
    again = Outputs.load(path, CARDS)
    assert again is not None and again.scores(CARDS, {"I21"}) == outputs.scores(CARDS, {"I21"})
    assert Outputs.load(path, CARDS[:1]) is None  # other cards: scored again, not misread
    assert Outputs.load(tmp_path / "none.json", CARDS) is None
