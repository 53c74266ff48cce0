"""The generative track: a small causal LM, its LoRA adapter, prompts, answers and their scores.

The adapter sits on every linear layer of the adapted layers (attention and MLP: peft's
``all-linear``); measured on SmolLM2, it lowers the loss after 50 steps from 2.52 to 1.58 per
answer token against the attention's q/v projections alone, at about the same step time (the
frozen layers below dominate).  It is all that trains and all that crosses the network, in
the encoder's wire format (:func:`model.to_wire`).
Prompts go through the model's own chat template; answers are decoded greedily up to a cap.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from federimed.data.records import DIAGNOSIS_KIND, INSTRUCTION, Flashcard
from federimed.learning.batching import Encoded, autocast, batch_tensors, frozen_weights_cast
from federimed.learning.dpsgd import IGNORE_INDEX
from federimed.learning.features import layer_stack
from federimed.learning.model import top_layers
from federimed.learning.training import answer_logits, replay_if_cached
from federimed.runconfig import LoraSettings
from federimed.runrecord import read_provenance
from federimed.tracks.generative.smollm2 import GeneratorError, resolve_generator

IGNORE = IGNORE_INDEX  # label of the prompt's and the padding's tokens: no loss on them
# For a tokenizer without a chat template (GPT-2): the same roles, in plain text.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% else %}Answer: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def load_generator_tokenizer(name: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_generator(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_TEMPLATE
    tokenizer.padding_side = "right"  # training batches are trimmed at the right
    return tokenizer


def build_generator(
    name: str, lora: LoraSettings, seed: int = 0, checkpointing: bool = False
) -> PeftModel:
    """The pretrained causal LM, frozen, with a fresh LoRA adapter on its attention;
    ``checkpointing``: activations recomputed in the backward pass (less memory)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_generator(name), dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings' output must carry a grad
    torch.manual_seed(seed)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=linear_maps(model),
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores its weights transposed
        # the top `lora-layers` only: backpropagation then stops below them
        layers_to_transform=top_layers(model, lora.layers),
    )
    return get_peft_model(model, config)


def linear_maps(model: torch.nn.Module) -> list[str]:
    """The names of the linear maps inside a transformer layer (attention and MLP: ``q_proj``
    ... ``down_proj`` for SmolLM2, ``c_attn``, ``c_proj``, ``c_fc`` for GPT-2); peft's
    ``all-linear`` names the same ones but cannot be combined with ``layers_to_transform``."""
    from transformers.pytorch_utils import Conv1D

    stack = layer_stack(model)
    if stack is None:
        raise GeneratorError(f"{type(model).__name__}: no list of transformer layers found")
    return sorted({name.rsplit(".", 1)[-1] for name, module in stack[0].named_modules()
                   if isinstance(module, torch.nn.Linear | Conv1D)})  # fmt: skip


def _messages(question: str, instruction: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": instruction}] if instruction else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, instruction: str = "", limit: int = 0
) -> list[int]:
    """The chat-templated prompt ending where the answer starts; the question cut to fit
    ``limit`` tokens in all (0: no limit), its end dropped, never the template's parts."""
    ids = _templated(tokenizer, question, instruction)
    if limit and len(ids) > limit:
        overflow = len(ids) - limit
        words = tokenizer(question, add_special_tokens=False)["input_ids"]
        kept = cast(str, tokenizer.decode(words[: max(0, len(words) - overflow)]))
        ids = _templated(tokenizer, kept, instruction)[:limit]
    return ids


def _templated(tokenizer: PreTrainedTokenizerBase, question: str, instruction: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        _messages(question, instruction), add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_cards(
    cards: Sequence[Flashcard], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Encoded:
    """Prompt and answer as one sequence; the loss only on the answer and its end token."""
    rows = []
    for card in cards:
        answer = answer_tokens(tokenizer, card.answer)
        answer = [*answer[: max(1, max_length // 2)], tokenizer.eos_token_id]
        prompt = prompt_ids(tokenizer, card.question, card.instruction, max_length - len(answer))
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(target)
        mask[i, : len(ids)] = 1
    return Encoded(input_ids=input_ids, attention_mask=mask, labels=labels)


def answer_tokens(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """An answer's tokens as they follow the prompt (without the end token): after a plain
    template's "Answer:" with a space, as GPT-2's BPE expects a word."""
    lead = " " if _plain(tokenizer) else ""
    return tokenizer(lead + answer, add_special_tokens=False)["input_ids"]


def _plain(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer.chat_template == PLAIN_TEMPLATE


@torch.no_grad()
def answer_token_losses(
    model: torch.nn.Module, data: Encoded, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Per card: the summed loss over its answer tokens, and how many answer tokens it has
    (so that any subset of cards, such as those about one hospital's unseen conditions, has
    its own perplexity)."""
    model.to(device).eval()
    sums = np.zeros(len(data), dtype=np.float64)
    counts = np.zeros(len(data), dtype=np.int64)
    with replay_if_cached(model, data) as replay, frozen_weights_cast(model, device):
        for start in range(0, len(data), 16):
            rows = np.arange(start, min(start + 16, len(data)))
            with autocast(device):
                logits, targets = answer_logits(model, batch_tensors(data, rows, device), replay)
            losses = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
            )
            sums[rows] = losses.sum(dim=1).double().cpu().numpy()
            counts[rows] = (targets != IGNORE).sum(dim=1).cpu().numpy()
    return sums, counts


def answer_loss(model: torch.nn.Module, data: Encoded, device: torch.device) -> float:
    """Mean loss per answer token over all cards (its exp is the answers' perplexity: how
    surprised the model is by the reference answers; lower is better)."""
    sums, counts = answer_token_losses(model, data, device)
    return float(sums.sum() / max(int(counts.sum()), 1))


def perplexity(sums: np.ndarray, counts: np.ndarray) -> float:
    """exp of the mean loss per answer token (capped: an untrained model's can overflow)."""
    return math.exp(min(float(sums.sum()) / max(int(counts.sum()), 1), 50.0))


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cards: Sequence[Flashcard],
    device: torch.device,
    max_new_tokens: int,
    max_length: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers, ``max_new_tokens`` at most each, in batches of prompts padded left."""
    model.to(device).eval()
    answers: list[str] = []
    limit = max(8, max_length - max_new_tokens)
    with frozen_weights_cast(model, device):
        for start in range(0, len(cards), batch_size):
            prompts = [prompt_ids(tokenizer, c.question, c.instruction, limit)
                       for c in cards[start : start + batch_size]]  # fmt: skip
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            with autocast(device):
                out = _generate(model)(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            answers += [_decoded(tokenizer, row[width:]) for row in out]
    return answers


@torch.no_grad()
def choice_log_likelihoods(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cards: Sequence[Flashcard],
    choices: Sequence[str],
    device: torch.device,
    max_length: int,
) -> np.ndarray:
    """``[cards, choices]``: the log-likelihood of each choice, followed by the end of the
    answer, as the whole answer to each card (how MedQA-style benchmarks score a generative
    model: the answer it finds likeliest among the options).  The prompt runs once per card;
    its cached keys and values then serve every choice in one batch, so 32 choices cost about
    one more prompt's worth of tokens, not 32 prompts."""
    model.to(device).eval()
    options = [[*answer_tokens(tokenizer, choice), tokenizer.eos_token_id] for choice in choices]
    width = max(len(o) for o in options)
    ids = torch.full((len(options), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, option in enumerate(options):
        ids[i, : len(option)], mask[i, : len(option)] = torch.tensor(option), 1
    ids, mask = ids.to(device), mask.to(device)
    out = np.zeros((len(cards), len(options)), dtype=np.float64)
    limit = max(8, max_length - width)
    with frozen_weights_cast(model, device):
        for row, card in enumerate(cards):
            prompt = torch.tensor([prompt_ids(tokenizer, card.question, card.instruction, limit)])
            with autocast(device):
                first = model(input_ids=prompt.to(device), use_cache=True)
                cache = first.cache
                cache.batch_repeat_interleave(len(options))
                seen = torch.ones((len(options), prompt.shape[1]), dtype=mask.dtype, device=device)
                rest = model(
                    input_ids=ids, attention_mask=torch.cat([seen, mask], dim=1), cache=cache
                )
            # token 0 is predicted by the prompt's last position, token j by the choice's j-1
            logits = torch.cat([first.logits[:, -1:].expand(len(options), -1, -1),
                                rest.logits[:, :-1]], dim=1).float()  # fmt: skip
            picked = torch.log_softmax(logits, dim=-1).gather(2, ids.unsqueeze(2)).squeeze(2)
            out[row] = (picked * mask).sum(dim=1).double().cpu().numpy()
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or not common:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def score_answers(
    cards: Sequence[Flashcard],
    answers: Sequence[str] | None,
    unseen: set[str] | None = None,
    losses: tuple[np.ndarray, np.ndarray] | None = None,
    picks: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """Exact match on diagnosis cards, token-F1 on the others, with ``losses`` (per card,
    :func:`answer_token_losses`) the reference answers' perplexity, and with ``picks`` (per
    card, the choice the model finds likeliest, :func:`pick_choices`) the multiple-choice
    accuracy on diagnosis cards; the same on the cards about ``unseen`` conditions (those a
    hospital never trained on) when given. Without ``answers`` (None: none were generated),
    no exact match and no token-F1."""
    metrics = _scores(cards, answers, picks)
    if losses is not None:
        metrics["perplexity"] = perplexity(*losses)
    if unseen:
        picked = np.array([card.code in unseen for card in cards], dtype=bool)
        if picked.any():

            def kept(values: Sequence) -> list:
                return [v for v, keep in zip(values, picked, strict=True) if keep]

            found = _scores(kept(cards), answers and kept(answers), picks and kept(picks))
            if losses is not None:
                found["perplexity"] = perplexity(losses[0][picked], losses[1][picked])
            metrics |= {f"unseen_{k}": v for k, v in found.items()}
    return metrics


def _scores(
    cards: Sequence[Flashcard],
    answers: Sequence[str] | None,
    picks: Sequence[str | None] | None,
) -> dict[str, float]:
    metrics = {"num_examples": float(len(cards))}
    if answers is not None:
        pairs = list(zip(cards, answers, strict=True))
        exact = [normalize(a) == normalize(c.answer) for c, a in pairs if c.kind == DIAGNOSIS_KIND]
        f1 = [token_f1(a, c.answer) for c, a in pairs if c.kind != DIAGNOSIS_KIND]
        if exact:
            metrics["exact_match"] = float(np.mean(exact))
        if f1:
            metrics["token_f1"] = float(np.mean(f1))
    if picks is not None:
        chosen = zip(cards, picks, strict=True)
        right = [p == c.answer for c, p in chosen if c.kind == DIAGNOSIS_KIND]
        if right:
            metrics["choice_accuracy"] = float(np.mean(right))
    return metrics


def pick_choices(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cards: Sequence[Flashcard],
    choices: Sequence[str],
    device: torch.device,
    max_length: int,
) -> list[str | None]:
    """Per card, the likeliest of ``choices`` for a diagnosis card, None for the others."""
    asked = [card for card in cards if card.kind == DIAGNOSIS_KIND]
    best = iter(
        choice_log_likelihoods(model, tokenizer, asked, choices, device, max_length).argmax(1)
        if asked and choices
        else []
    )
    return [choices[next(best)] if card.kind == DIAGNOSIS_KIND and choices else None
            for card in cards]  # fmt: skip


def load_answerer(folder: Path) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """A run's generative model (``final/`` or its ``adapter/``): the base model its adapter
    names, with the adapter on it, and the tokenizer saved beside it."""
    folder = Path(folder)
    adapter = folder / "adapter" if (folder / "adapter").is_dir() else folder
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise GeneratorError(f"{folder}: not a generative model folder (no {config_file.name})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GeneratorError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("task_type") != TaskType.CAUSAL_LM.value:
        raise GeneratorError(f"{folder}: an adapter, but not a causal LM's (`federimed predict`?)")
    base = _base_model(adapter, config, config_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as error:
        raise GeneratorError(f"{folder}: its base model {base} cannot be loaded: {error}") from None
    try:
        tokenizer = load_generator_tokenizer(str(adapter))
        return PeftModel.from_pretrained(model, adapter).eval(), tokenizer
    except (OSError, ValueError) as error:
        what = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        raise GeneratorError(
            f"{adapter}: its adapter or tokenizer does not load ({what})"
        ) from None


def _base_model(adapter: Path, config: dict, config_file: Path) -> str:
    """The folder or hub id of the adapter's base model. peft records the path it was trained
    on, which is another machine's (or a container's) cache when the model was trained
    elsewhere: then the run's provenance names the generator, resolved here."""
    base = config.get("base_model_name_or_path")
    named = base if isinstance(base, str) and base else None
    if named and (Path(named).exists() or not Path(named).is_absolute()):  # here, or a hub id
        return named
    for folder in (adapter, adapter.parent):
        if provenance := read_provenance(folder):
            return resolve_generator(provenance.base_model)
    if named:
        raise GeneratorError(
            f"{config_file}: its base model {named} is not on this machine, and no "
            "provenance.json beside it names the generator"
        )
    raise GeneratorError(f"{config_file}: names no base model (base_model_name_or_path)")


def asks_for_diagnosis(question: str) -> bool:
    """Whether ``question`` asks which condition a patient has (as the diagnosis cards do)."""
    return "diagnosis" in question.lower()


def ranked_choices(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    choices: Sequence[str],
    max_length: int,
) -> list[tuple[str, float]]:
    """``choices`` from the likeliest down, each with its share of the probability among them
    (the likelihoods of :func:`choice_log_likelihoods`, normalised over the choices)."""
    card = Flashcard(question, "", INSTRUCTION, DIAGNOSIS_KIND)
    device = next(model.parameters()).device
    scores = choice_log_likelihoods(model, tokenizer, [card], choices, device, max_length)[0]
    shares = np.exp(scores - scores.max())
    shares /= shares.sum()
    order = np.argsort(-scores, kind="stable")
    return [(choices[i], float(shares[i])) for i in order]


@torch.no_grad()
def ask(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    max_new_tokens: int,
    on_text: Callable[[str], None] | None = None,
    choices: Sequence[str] = (),
) -> str:
    """The greedy answer to ``question``, prompted as the model was trained (MedAlpaca's
    instruction, through its chat template); a long question is cut to fit the model's context.
    ``on_text`` receives the answer piece by piece as it is generated (a terminal prints it as
    it comes).  A question that asks for a diagnosis, given the conditions to choose from
    (``choices``), is answered first with the likeliest of them (as the model is scored:
    free text can name a condition that does not exist), and its free-text answer after."""
    context = getattr(model.config, "max_position_embeddings", 0) or 2048
    limit = max(8, context - max_new_tokens)
    emit = on_text or (lambda text: None)
    lead = ""
    if choices and asks_for_diagnosis(question):
        (best, share), *_ = ranked_choices(model, tokenizer, question, choices, context)
        lead = f"{best} (the likeliest of {len(choices)} conditions, {share:.0%})\nFree text: "
        emit(lead)
    ids = torch.tensor([prompt_ids(tokenizer, question, INSTRUCTION, limit)])
    streamer = None
    if on_text is not None:
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                emit(text)

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = _generate(model)(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )
    return lead + _decoded(tokenizer, out[0, ids.shape[1] :])


def _generate(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """A causal LM's (or its peft wrapper's) ``generate``, which torch types as a module."""
    return cast(Callable[..., torch.Tensor], model.generate)


def _decoded(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> str:
    """One answer's text (``decode`` of one sequence is one string)."""
    return cast(str, tokenizer.decode(ids, skip_special_tokens=True)).strip()
