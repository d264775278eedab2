"""Ring-A-Bell (Tsai et al., ICLR 2024): a black-box prompt attack that needs only the attacker's own text encoder.

A concept is a direction in the text encoder's output: the mean, over prompt pairs that differ only by the concept,
of the difference of their full (L, D) last hidden states (on SDXL, the packed condition of both encoders:
`text_encoder` may be an `erase.attack.WordEncoder`). A prompt P pushed along it, TE(P) + eta * v, is the goal;
a genetic search over K real token ids finds the hard prompt whose encoding is nearest (squared L2 over all L x D)
to the goal. The prompt is then given to the erased model: no gradient of, nor query to, the model under attack.
Checked against the authors' notebooks (github chiayi-hsu/Ring-A-Bell, Get_Concept_Vector.ipynb and
InversePrompt.ipynb, cited as notebook cell.line).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from .attack import AttackResult, WordEncoder, as_word_encoder, prompt_ids

Encoder = nn.Module | WordEncoder  # a CLIP text encoder, or (SDXL) both of a pipeline's
ENCODE_BATCH = 64  # prompts per text-encoder call when building a concept vector


@dataclass(frozen=True)
class RingABell:
    """The attack's settings: `tokens` free token ids (K; the authors' `length`, between BOS and EOS), concept
    strength `strength` (eta, their `cof`), and the genetic search: `population` prompts, of which the best half
    are parents each generation, for `generations` generations; each parent crosses over with probability
    `crossover` (one point, two children), each prompt but the best mutates one token with probability `mutation`."""

    tokens: int = 16
    strength: float = 3.0
    population: int = 200
    generations: int = 3000
    mutation: float = 0.25
    crossover: float = 0.5

    def __post_init__(self) -> None:
        for name, least in (("tokens", 1), ("population", 2), ("generations", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"Ring-A-Bell's {name} must be an integer >= {least}, got {value!r}")
        if not isinstance(self.strength, int | float) or isinstance(self.strength, bool):
            raise ValueError(f"Ring-A-Bell's strength (eta) must be a number, got {self.strength!r}")
        for name in ("mutation", "crossover"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ValueError(f"Ring-A-Bell's {name} rate must be a number in [0, 1], got {value!r}")

    def replace(self, **changes) -> RingABell:
        """These settings with some changed (validated again); an unknown name is a one-line error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(
                f"unknown Ring-A-Bell setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}"
            )
        return RingABell(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


PRESETS: dict[str, RingABell] = {
    # InversePrompt.ipynb cell 2 (lines 1-6): population_size 200, generation 3000, mutateRate 0.25, crossoverRate
    # 0.5, length 16, cof 3 (the nudity and violence runs, cells 12 and 14, both use them).
    "paper": RingABell(tokens=16, strength=3.0, population=200, generations=3000, mutation=0.25, crossover=0.5),
    # The paper's K = 77 (the whole context): cell 2.5 says "for K = 77, please set length = 75".
    "paper-k77": RingABell(tokens=75, strength=3.0, population=200, generations=3000, mutation=0.25, crossover=0.5),
    # Ours for the toy, whose 16-token context cannot hold the paper's 16 free tokens: the best mean of
    # scripts/tune_ringabell.py's trials (150 generations, population 200, tokens 6 / 14 x eta 1 / 3 / 6, 4 attacked
    # prompts x 2 seeds per target, against UCE `toy`) on the style tuning targets, ties to fewer tokens. No trial
    # beat the erased model's own plain-prompt rate there: Pop_Art ASR 12.5 / 0 / 0 / 0 / 0 / 0 (no attack 12.5,
    # original 100), Watercolor 37.5 / 25 / 12.5 / 12.5 / 37.5 / 25 (no attack 50, original 100). The object
    # targets (Cats, Towers) were not reached within the run's time. Tuning figures, not results.
    "toy": RingABell(tokens=6, strength=1.0, population=200, generations=150, mutation=0.25, crossover=0.5),
}


def preset(name: str) -> RingABell:
    if name not in PRESETS:
        raise ValueError(f"unknown Ring-A-Bell preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: Encoder, prompts: list[str]) -> torch.Tensor:
    """(N, L, D) float32 last hidden states of `prompts`, padded and cut to the context as a pipeline does."""
    encoder = as_word_encoder(text_encoder)
    chunks = [
        encoder.encode(torch.cat([prompt_ids(tokenizer, p) for p in prompts[i : i + ENCODE_BATCH]]).to(encoder.device))
        for i in range(0, len(prompts), ENCODE_BATCH)
    ]
    return torch.cat(chunks).float()


def concept_vector(tokenizer, text_encoder: Encoder, with_concept: list[str], without_concept: list[str]):
    """(L, D) the concept's direction: mean over pairs of TE(with_concept[i]) - TE(without_concept[i]), full hidden
    states (Get_Concept_Vector.ipynb cells 2-3: `[0]` of the encoder, mean of the differences over pairs)."""
    for name, prompts in (("with_concept", with_concept), ("without_concept", without_concept)):
        if isinstance(prompts, str) or not isinstance(prompts, list | tuple) or not prompts:
            raise ValueError(f"Ring-A-Bell's {name} must be a non-empty list of prompts, got {prompts!r}")
    if len(with_concept) != len(without_concept):
        raise ValueError(f"Ring-A-Bell's prompt pairs do not match: {len(with_concept)} with the concept, "
                         f"{len(without_concept)} without")  # fmt: skip
    with_states = encode_prompts(tokenizer, text_encoder, list(with_concept))
    without_states = encode_prompts(tokenizer, text_encoder, list(without_concept))
    return (with_states - without_states).mean(dim=0)


def goal_embedding(tokenizer, text_encoder: Encoder, prompt: str, vector: torch.Tensor, strength: float):
    """(L, D) TE(prompt) + strength * vector, what the found prompt's encoding should be (notebook cell 12.5)."""
    state = encode_prompts(tokenizer, text_encoder, [prompt])[0]
    if vector.shape != state.shape:
        raise ValueError(f"the concept vector has shape {tuple(vector.shape)}, the text encoder's output "
                         f"{tuple(state.shape)}: build it with this tokenizer and text encoder")  # fmt: skip
    return state + strength * vector.to(state.device, torch.float32)


def drawable_ids(tokenizer, text_encoder: Encoder) -> torch.Tensor:
    """The token ids the search may use: every vocabulary id but the special ones (BOS, EOS, padding, unknown; the
    authors draw from [1, 49406), notebook cell 9.23, which also leaves out SD2's padding id 0)."""
    rows = min(len(tokenizer), as_word_encoder(text_encoder).vocab_size)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    special |= set(tokenizer.all_special_ids)
    keep = torch.ones(rows, dtype=torch.bool)
    keep[[i for i in special if i is not None and 0 <= i < rows]] = False
    return keep.nonzero().flatten()


def sequences(tokenizer, content: torch.Tensor) -> torch.Tensor:
    """(N, L) ids `[BOS, content (K), EOS, pad...]` for content (N, K) (notebook cell 12.7)."""
    n, k = content.shape
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((n, length), pad, dtype=torch.long, device=content.device)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 1 : k + 1] = content
    ids[:, k + 1] = tokenizer.eos_token_id
    return ids


@torch.no_grad()
def fitness(tokenizer, text_encoder: Encoder, goal: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """(N,) squared L2 distance, over all L x D, of each prompt's encoding to the goal: one text-encoder batch
    (notebook cell 9.1-9.5). Lower is fitter."""
    encoder = as_word_encoder(text_encoder)
    states = encoder.encode(sequences(tokenizer, content).to(encoder.device)).float()
    return ((states - goal.to(encoder.device)) ** 2).sum(dim=(1, 2))


def breed(parents: torch.Tensor, vocab: torch.Tensor, settings: RingABell, generator: torch.Generator):
    """The next population from parents (H, K), best first: the parents, then two children per parent that
    crosses over (one point s in [0, K): the first s tokens of one, the rest of a random partner's, notebook cell
    9.7-9.17), then one token of each prompt but the first (the elite) replaced by a random drawable id with
    probability `mutation` (cell 9.19-9.25). `vocab` (CPU) holds the drawable ids."""
    h, k = parents.shape
    draw = {"generator": generator, "device": generator.device}
    crossing = (torch.rand(h, **draw) < settings.crossover).nonzero().flatten().to(parents.device)
    partner = torch.randint(h, (len(crossing),), **draw).to(parents.device)
    point = torch.randint(k, (len(crossing), 1), **draw).to(parents.device)
    first = torch.arange(k, device=parents.device)[None] < point  # (C, K) the positions before the point
    mine, theirs = parents[crossing], parents[partner]
    population = torch.cat([parents, torch.where(first, mine, theirs), torch.where(first, theirs, mine)])
    mutating = torch.rand(len(population), **draw) < settings.mutation
    mutating[0] = False  # keep the elite: the best fitness never gets worse
    rows = mutating.nonzero().flatten().to(parents.device)
    position = torch.randint(k, (len(rows),), **draw).to(parents.device)
    value = vocab[torch.randint(len(vocab), (len(rows),), **draw).cpu()].to(parents.device)
    population[rows, position] = value
    return population


def ring_a_bell(
    tokenizer,
    text_encoder: Encoder,
    prompt: str,
    vector: torch.Tensor,
    settings: RingABell,
    generator: torch.Generator,
    progress: bool = True,
) -> AttackResult:
    """The hard prompt of `settings.tokens` real tokens whose encoding by `text_encoder` (the original, the
    attacker's own) is nearest to TE(prompt) + eta * vector. `prompt` is the target prompt, concept words included,
    as the authors attack each I2P prompt itself (notebook cell 12.3-12.5). `losses`: the best fitness of each
    generation; `tokens` (1, K) the found ids, `ids` (1, L) the whole sequence, `embeds` its table rows."""
    if not isinstance(settings, RingABell):
        raise ValueError(f"settings must be a RingABell, got {type(settings).__name__}")
    length = tokenizer.model_max_length
    if settings.tokens > length - 2:
        raise ValueError(f"Ring-A-Bell's tokens ({settings.tokens}) must leave room for BOS and EOS in the "
                         f"tokenizer's context of {length}: at most {length - 2}")  # fmt: skip
    encoder = as_word_encoder(text_encoder)
    device = encoder.device
    goal = goal_embedding(tokenizer, text_encoder, prompt, vector, settings.strength)
    vocab = drawable_ids(tokenizer, text_encoder)
    if len(vocab) == 0:
        raise ValueError("the tokenizer has no token ids besides its special ones for Ring-A-Bell to draw")
    start = torch.randint(len(vocab), (settings.population, settings.tokens), generator=generator,
                          device=generator.device)  # fmt: skip
    population = vocab[start.cpu()].to(device)
    losses: list[float] = []
    keep = max(1, settings.population // 2)  # the top half survive (notebook cell 12.11)
    for generation in tqdm(range(settings.generations), desc="Ring-A-Bell", disable=not progress):
        score = fitness(tokenizer, text_encoder, goal, population)
        order = torch.argsort(score, stable=True)
        losses.append(float(score[order[0]]))
        parents = population[order[:keep]]
        if generation != settings.generations - 1:
            population = breed(parents, vocab, settings, generator)
    found = parents[:1]  # (1, K) the fittest of the last generation
    ids = sequences(tokenizer, found)
    return AttackResult(
        prefix=encoder.vectors(found),
        ids=ids,
        embeds=encoder.words(ids).clone(),
        losses=losses,
        tokens=found.clone(),
        text=tokenizer.decode(found[0].tolist()),
    )
