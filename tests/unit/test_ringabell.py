"""Ring-A-Bell on the tiny pipeline's random text encoder: the concept vector and the fitness agree with independent
computations, the genetic search keeps its elite and gets closer to the goal, it draws only real non-special tokens,
it is reproducible under a seed, and bad inputs are one-line errors."""

from __future__ import annotations

import pytest
import torch

from erase.attack import word_embedding
from erase.ringabell import (
    PRESETS,
    RingABell,
    breed,
    concept_vector,
    drawable_ids,
    preset,
    ring_a_bell,
)
from tests.unit.helpers import fresh_pipe, padded_vectors

WITH = ["a van gogh painting", "a cat in van gogh style", "a dog image in van gogh style"]
WITHOUT = ["a painting", "a cat", "a dog image"]
PROMPT = "a cat in van gogh style"
SMALL = RingABell(tokens=4, strength=3.0, population=16, generations=25, mutation=0.25, crossover=0.5)


@pytest.fixture(scope="module")
def pipe():
    return fresh_pipe()


@pytest.fixture(scope="module")
def vector(pipe):
    return concept_vector(pipe.tokenizer, pipe.text_encoder, WITH, WITHOUT)


def attack(pipe, vector, settings=SMALL, seed=0, prompt=PROMPT):
    generator = torch.Generator().manual_seed(seed)
    return ring_a_bell(pipe.tokenizer, pipe.text_encoder, prompt, vector, settings, generator, progress=False)


def special_ids(tokenizer) -> set[int]:
    return {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}


def test_concept_vector_is_the_mean_difference_of_prompts_encoded_one_by_one(pipe, vector):
    differences = [padded_vectors(pipe, w) - padded_vectors(pipe, wo) for w, wo in zip(WITH, WITHOUT)]
    expected = torch.stack(differences).mean(dim=0)
    assert vector.shape == expected.shape == (pipe.tokenizer.model_max_length, 32)
    assert torch.allclose(vector.double(), expected, atol=1e-5)
    assert vector.abs().max() > 1e-3  # the pairs differ: a vector of zeros would pass the comparison above trivially


def test_best_fitness_never_increases_and_ends_below_the_first_generation(pipe, vector):
    result = attack(pipe, vector)
    assert len(result.losses) == SMALL.generations
    assert all(later <= earlier for earlier, later in zip(result.losses, result.losses[1:]))
    assert result.losses[-1] < result.losses[0]


def test_found_prompt_is_real_non_special_tokens_and_its_table_rows(pipe, vector):
    tok = pipe.tokenizer
    result = attack(pipe, vector)
    found = result.tokens[0].tolist()
    assert len(found) == SMALL.tokens
    assert not set(found) & special_ids(tok)
    assert all(0 <= i < len(tok) for i in found)
    ids = result.ids[0]
    assert ids.shape == (tok.model_max_length,)
    assert ids[0] == tok.bos_token_id and ids[SMALL.tokens + 1] == tok.eos_token_id
    assert ids[1 : SMALL.tokens + 1].tolist() == found
    assert (ids[SMALL.tokens + 2 :] == tok.pad_token_id).all()
    table = word_embedding(pipe.text_encoder).weight
    assert torch.equal(result.embeds[0], table[ids])
    assert torch.equal(result.prefix[0], table[result.tokens[0]])
    assert result.text == tok.decode(found)


def test_fitness_of_the_result_matches_an_independent_computation(pipe, vector):
    result = attack(pipe, vector)
    goal = padded_vectors(pipe, PROMPT) + SMALL.strength * vector.double()
    with torch.no_grad():
        state = pipe.text_encoder(result.ids)[0][0].double()
    assert result.losses[-1] == pytest.approx(float(((state - goal) ** 2).sum()), rel=1e-4)
    assert torch.allclose(result.condition(pipe.text_encoder)[0].double(), state, atol=1e-5)


def test_same_seed_same_prompt_other_seed_other_search(pipe, vector):
    first, again, other = attack(pipe, vector, seed=3), attack(pipe, vector, seed=3), attack(pipe, vector, seed=4)
    assert torch.equal(first.tokens, again.tokens) and first.losses == again.losses
    assert first.losses != other.losses


def test_breed_keeps_the_elite_crosses_parents_and_mutates_into_the_drawable_vocabulary(pipe):
    vocab = drawable_ids(pipe.tokenizer, pipe.text_encoder)
    assert not set(vocab.tolist()) & special_ids(pipe.tokenizer)
    assert len(vocab) == len(pipe.tokenizer) - len(special_ids(pipe.tokenizer))
    parents = vocab[torch.randint(len(vocab), (6, 5), generator=torch.Generator().manual_seed(0))]
    generator = torch.Generator().manual_seed(1)
    crossed = breed(parents, vocab, RingABell(tokens=5, population=12, mutation=0.0, crossover=1.0), generator)
    assert crossed.shape == (18, 5) and torch.equal(crossed[:6], parents)
    for child in crossed[6:]:  # each child position holds some parent's token at that position
        assert ((parents == child[None]).any(dim=0)).all()
    mutated = breed(parents, vocab, RingABell(tokens=5, population=12, mutation=1.0, crossover=0.0), generator)
    assert torch.equal(mutated[0], parents[0])  # the elite is never mutated
    changed = (mutated != parents).sum(dim=1)
    assert (changed <= 1).all()  # one token at most (a redraw may give the same id)
    assert set(mutated.flatten().tolist()) <= set(vocab.tolist())


def test_special_tokens_are_never_drawn_over_a_whole_search(pipe, vector):
    settings = SMALL.replace(mutation=1.0, generations=40)
    result = attack(pipe, vector, settings=settings, seed=7)
    assert not set(result.tokens[0].tolist()) & special_ids(pipe.tokenizer)


def test_progress_bar_can_be_turned_off(pipe, vector, capsys):
    attack(pipe, vector, settings=SMALL.replace(generations=2))
    assert "Ring-A-Bell" not in capsys.readouterr().err


def test_presets_follow_the_released_notebook():
    assert preset("paper") == RingABell(16, 3.0, 200, 3000, 0.25, 0.5)
    assert PRESETS["paper-k77"].tokens == 75


@pytest.mark.parametrize(
    "changes",
    [
        {"tokens": 0},
        {"tokens": 2.5},
        {"population": 1},
        {"generations": 0},
        {"mutation": 1.5},
        {"crossover": -0.1},
        {"strength": "3"},
        {"unknown": 1},
    ],
)
def test_bad_settings_are_one_line_errors(changes):
    with pytest.raises(ValueError) as error:
        SMALL.replace(**changes)
    assert "\n" not in str(error.value)
    assert str(next(iter(changes))) in str(error.value)


@pytest.mark.parametrize(
    "with_concept, without_concept, words",
    [
        (WITH, WITHOUT[:2], "3 with the concept, 2 without"),
        ([], [], "with_concept"),
        (WITH, [], "without_concept"),
        ("a van gogh painting", "a painting", "with_concept"),
    ],
)
def test_bad_pairs_are_one_line_errors(pipe, with_concept, without_concept, words):
    with pytest.raises(ValueError) as error:
        concept_vector(pipe.tokenizer, pipe.text_encoder, with_concept, without_concept)
    assert "\n" not in str(error.value) and words in str(error.value)


def test_bad_attack_inputs_are_one_line_errors(pipe, vector):
    too_long = SMALL.replace(tokens=pipe.tokenizer.model_max_length - 1)
    for bad, words in ((dict(settings=too_long), "at most 14"), (dict(vector=vector[:, :8]), "concept vector")):
        with pytest.raises(ValueError) as error:
            attack(pipe, **{"vector": vector, **bad})
        assert "\n" not in str(error.value) and words in str(error.value)
    with pytest.raises(ValueError, match="unknown Ring-A-Bell preset 'nope'"):
        preset("nope")
