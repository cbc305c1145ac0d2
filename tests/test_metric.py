"""The sampled accuracy (mean of k draws per prompt at a temperature) against the exact probability a
one-token completion is correct, enumerated over the vocabulary in float64."""

import math

import torch

from opd.evaluation import evaluate
from opd.models import chat_prompt_ids
from opd.tasks import Example
from opd.zoo import make_model


class FirstLetterTask:
    """Correct when the completion starts with the example's answer (a letter): a verifier whose
    probability under a model is an exact sum over the first token's distribution."""

    name = "first-letter"

    def reward(self, completion: str, example: Example) -> float:
        return 1.0 if completion.startswith(example.answer) else 0.0


def exact_probabilities(model, tokenizer, examples, temperature: float) -> list[float]:
    """P(first sampled token decodes to a text starting with the answer), over the tokenizer's ids."""
    texts = [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]
    out = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([chat_prompt_ids(tokenizer, example.messages)])
            logits = model(input_ids=ids).logits[0, -1, : len(tokenizer)].double()
            probs = torch.softmax(logits / temperature, -1)
            out.append(sum(float(probs[i]) for i, t in enumerate(texts) if t.startswith(example.answer)))
    return out


def peaked_model(tokenizer):
    model = make_model(tokenizer, layers=1, width=32, seed=5).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)  # peaked enough that the answer's share is far from 0 and 1
    return model


def letter_examples(model, tokenizer, count: int) -> list[Example]:
    """Prompts whose answer alternates between the first character of the model's most likely token and
    of a less likely one (partial UTF-8 bytes skipped), so that per-prompt probabilities differ."""
    examples = []
    with torch.no_grad():
        for i in range(count):
            messages = [{"role": "user", "content": f"word {i} of {count}"}]
            ids = torch.tensor([chat_prompt_ids(tokenizer, messages)])
            ranked = model(input_ids=ids).logits[0, -1, : len(tokenizer)].argsort(descending=True).tolist()
            firsts = []
            for token in ranked:
                text = tokenizer.decode([token], skip_special_tokens=True)
                if text and text[0] != "\ufffd" and text[0] not in firsts:
                    firsts.append(text[0])
            examples.append(Example(messages, firsts[i % 2]))
    return examples


def test_sampled_accuracy_matches_the_exact_probability_within_binomial_noise(tokenizer):
    model = peaked_model(tokenizer)
    examples = letter_examples(model, tokenizer, 24)
    k = 64
    for temperature in (1.0, 2.0):
        exact = exact_probabilities(model, tokenizer, examples, temperature)
        result = evaluate(model, tokenizer, FirstLetterTask(), examples, max_new_tokens=1, samples=k,
                          sample_temperature=temperature, seed=3)
        expected = sum(exact) / len(exact)
        se = math.sqrt(sum(p * (1 - p) for p in exact) / k) / len(exact)  # the mean of N k Bernoulli draws
        assert abs(result.sampled_accuracy - expected) < 4 * se, (temperature, result.sampled_accuracy, expected, se)
        # the test can tell temperatures apart: the other temperature's exact figure is far outside the noise
        other = exact_probabilities(model, tokenizer, examples, 3.0 - temperature)
        assert abs(sum(other) / len(other) - expected) > 8 * se
        if temperature == 1.0:
            assert 0.1 < expected < 0.9  # neither all right nor all wrong: the draws carry information


def test_without_samples_only_the_greedy_accuracy_is_reported(tokenizer):
    model = peaked_model(tokenizer)
    examples = letter_examples(model, tokenizer, 6)
    result = evaluate(model, tokenizer, FirstLetterTask(), examples, max_new_tokens=1)
    assert result.sampled_accuracy is None and result.accuracy is not None
    greedy_hits = [1.0 if ex.answer == tokenizer.decode(
        [int(model(input_ids=torch.tensor([chat_prompt_ids(tokenizer, ex.messages)])).logits[0, -1,
         : len(tokenizer)].argmax())], skip_special_tokens=True)[:1] else 0.0 for ex in examples]
    assert result.accuracy == sum(greedy_hits) / len(greedy_hits)


def test_each_draw_is_scored_against_its_own_prompt(tokenizer):
    """Near temperature 0 every draw is its prompt's greedy token, so the sampled accuracy must equal the
    greedy one exactly, on prompts whose greedy tokens differ (two classes, interleaved): a draw scored
    against another prompt's answer would lower it."""
    model = make_model(tokenizer, layers=1, width=32, seed=5).eval()
    with torch.no_grad():  # attention that depends on the prompt, and a peaked head
        model.get_output_embeddings().weight.mul_(10)
        for name, parameter in model.named_parameters():
            if "v_proj" in name or "o_proj" in name:
                parameter.mul_(8)
    classes: dict[str, list[Example]] = {}
    with torch.no_grad():
        for i in range(400):
            messages = [{"role": "user", "content": f"word {i} of 400"}]
            ids = torch.tensor([chat_prompt_ids(tokenizer, messages)])
            top = model(input_ids=ids).logits[0, -1, : len(tokenizer)].topk(2)
            first = tokenizer.decode([int(top.indices[0])], skip_special_tokens=True)[:1]
            clear = float(top.values[0] - top.values[1]) > 0.3  # at T=0.01 the runner-up has e^-30 of the odds
            if first and first != "\ufffd" and clear:
                classes.setdefault(first, []).append(Example(messages, first))
    (a, first_class), (b, second_class) = sorted(classes.items(), key=lambda kv: -len(kv[1]))[:2]
    examples = [ex for pair in zip(first_class[:4], second_class[:4], strict=True) for ex in pair]
    assert a != b and len(examples) == 8
    result = evaluate(model, tokenizer, FirstLetterTask(), examples, max_new_tokens=1, samples=4,
                      sample_temperature=0.01)
    assert result.accuracy == 1.0 and result.sampled_accuracy == 1.0
