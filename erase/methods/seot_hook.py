"""SEOT's patch as attached to a pipeline: the regularised rows (where and how much) and the hooks that write them.

SD 1.x/2.x: a forward hook on the text encoder regularises its last hidden state (and the pooled EOS row to match).
SDXL (ours; the authors released SD 1.x code only): the UNet reads both encoders' penultimate states and the second
encoder's pooled embedding, so a hook on each encoder regularises its penultimate state's concept and EOT rows (each
encoder's own matrix χ), and the second's last hidden state too, whose EOS row, projected, is the pooled embedding.
`pipe(..., clip_skip=n)` on SDXL reads an earlier layer, which the patch leaves as it is.

With `retain_fraction` > 0 a UNet pre-hook gives the early steps their original rows (and SDXL's pooled embedding)
back, found by the bytes of each encoder's regularised last row.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .. import runtime
from ..conditioning import is_sdxl
from ..runtime import Runtime

KIND = "seot"
EOT_CHOICES = ("all", "eos", "none")  # EOS and every padding position after it / the EOS token only / neither
STASH_SIZE = 512  # regularised prompts whose original rows are kept for the early steps (retain_fraction > 0)


# ------------------------------------------------------------------------------------------------- the arithmetic
def soft_weight(matrix: torch.Tensor, alpha: float, beta: float = 1.0) -> torch.Tensor:
    """χ̂ = U·diag(β·e^(−α·σ)·σ)·Vᵀ of χ = U·diag(σ)·Vᵀ, in float32 (half-precision SVD is not supported
    everywhere), returned in χ's dtype."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return ((u * (beta * torch.exp(-alpha * s) * s)) @ vh).to(matrix.dtype)


# ---------------------------------------------------------------------------------------------- where and how much
@dataclass(frozen=True)
class Settings:
    """The patch's settings, checked (they come from a JSON file that may have been edited)."""

    concept_ids: tuple[tuple[int, ...], ...]
    eos_token_id: int
    alpha: float
    beta: float
    eot: str
    retain_fraction: float

    @classmethod
    def parse(cls, settings: dict[str, Any]) -> Settings:
        try:
            ids = tuple(tuple(int(i) for i in concept) for concept in settings["concept_ids"])
            values = (int(settings["eos_token_id"]), float(settings["alpha"]), float(settings["beta"]))
            parsed = cls(ids, *values, str(settings["eot"]), float(settings["retain_fraction"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"SEOT patch settings are incomplete or malformed ({err!r}); expected concept_ids, "
                             "eos_token_id, alpha, beta, eot, retain_fraction") from None  # fmt: skip
        in_range = (
            ids and all(ids) and parsed.alpha > 0 and parsed.beta > 0 and parsed.eot in EOT_CHOICES
            and 0 <= parsed.retain_fraction < 1
        )  # fmt: skip
        if not in_range:
            raise ValueError(f"SEOT patch settings out of range (see SEOTConfig): {settings!r}")
        return parsed


def suppressed_positions(ids: Sequence[int], settings: Settings) -> list[int]:
    """Positions of one padded id sequence whose rows are regularised: every occurrence of every concept's tokens,
    plus the EOT positions of `settings.eot`; [] when no concept occurs (the prompt then passes unchanged)."""
    ids = list(ids)
    found: set[int] = set()
    for concept in settings.concept_ids:
        n, start = len(concept), 0
        while start + n <= len(ids):
            if tuple(ids[start : start + n]) == concept:
                found.update(range(start, start + n))
                start += n
            else:
                start += 1
    if not found:
        return []
    if settings.eot != "none" and settings.eos_token_id in ids[1:]:
        eos = ids.index(settings.eos_token_id, 1)
        found.update(range(eos, len(ids)) if settings.eot == "all" else (eos,))
    return sorted(found)


def suppress(hidden: torch.Tensor, input_ids: torch.Tensor, settings: Settings):
    """Text-encoder output (B, L, d) with each sample's concept and EOT rows regularised; also [(sample, positions)]
    of the changed samples (empty, and `hidden` itself returned, when none contains the concept)."""
    changed = []
    for b, row in enumerate(input_ids.tolist()):
        positions = suppressed_positions(row, settings)
        if positions:
            changed.append((b, positions))
    if not changed:
        return hidden, changed
    out = hidden.clone()
    for b, positions in changed:
        index = torch.tensor(positions, device=hidden.device)
        out[b, index] = soft_weight(hidden[b, index], settings.alpha, settings.beta)
    return out, changed


# ------------------------------------------------------------------------------------------------------ the hooks
def check_pipeline(pipe) -> None:
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError("SEOT patches the pipeline's text encoder; this pipeline has no text_encoder/tokenizer")


@dataclass(frozen=True)
class Stashed:
    """A regularised prompt's original rows at its regularised positions, and (SDXL's second encoder) its original
    pooled embedding."""

    positions: list[int]
    rows: torch.Tensor
    pooled: torch.Tensor | None = None


class _Originals:
    """Original rows of recently regularised prompts of one encoder, keyed by the bytes of the regularised last row
    (an exact identity of the prompt's embedding), so a UNet call can put them back during the early steps."""

    def __init__(self, size: int = STASH_SIZE):
        self.size = size
        self._rows: OrderedDict[bytes, Stashed] = OrderedDict()

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        return row.detach().float().cpu().numpy().tobytes()

    def put(self, fed: torch.Tensor, stashed: Stashed) -> None:
        key = self.key(fed[-1])
        self._rows[key] = Stashed(stashed.positions, stashed.rows.detach().cpu(),
                                  None if stashed.pooled is None else stashed.pooled.detach().cpu())  # fmt: skip
        self._rows.move_to_end(key)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)

    def find(self, last_row: torch.Tensor) -> Stashed | None:
        return self._rows.get(self.key(last_row))

    def clear(self) -> None:
        self._rows.clear()


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text encoder -> settings JSON attached


class SEOTHook:
    """The attached patch: a forward hook on each text encoder the UNet reads and, with retain_fraction > 0, a
    forward pre-hook on the UNet that gives the early steps their original rows. `remove()` takes them all off."""

    def __init__(self, pipe, patch: Runtime):
        check_pipeline(pipe)
        self.settings = Settings.parse(patch.settings)
        self._sdxl = is_sdxl(pipe.unet)
        self._encoders = [pipe.text_encoder, pipe.text_encoder_2] if self._sdxl else [pipe.text_encoder]
        self._widths = [int(e.config.hidden_size) for e in self._encoders]  # each one's columns of the UNet context
        signature = patch.settings_json()
        held = _ATTACHED.setdefault(self._encoders[0], [])
        if signature in held:
            raise ValueError("this SEOT patch is already attached to this text encoder (e.g. by erase.run); remove "
                             "it first rather than regularising twice")  # fmt: skip
        held.append(signature)
        self._signature = signature
        on_text = self._on_sdxl_text if self._sdxl else self._on_text
        self._hooks = [e.register_forward_hook(partial(on_text, i), with_kwargs=True) for i, e in
                       enumerate(self._encoders)]  # fmt: skip
        self._originals: list[_Originals] | None = None
        if self.settings.retain_fraction > 0:
            train_steps = getattr(pipe.scheduler.config, "num_train_timesteps", 1000)
            self.threshold = (1 - self.settings.retain_fraction) * train_steps
            self._originals = [_Originals() for _ in self._encoders]
            self._hooks.append(pipe.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for originals in self._originals or []:
            originals.clear()
        held = _ATTACHED.get(self._encoders[0], [])
        if self._signature in held:
            held.remove(self._signature)

    def _stash(self, index: int, new: torch.Tensor, old: torch.Tensor, changed, pooled=None) -> None:
        if self._originals is not None:
            for b, positions in changed:
                original = Stashed(positions, old[b, positions], None if pooled is None else pooled[b])
                self._originals[index].put(new[b], original)

    def _on_text(self, index, module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return None
        hidden = output[0]
        new, changed = suppress(hidden, ids, self.settings)
        if not changed:
            return None
        if kwargs.get("output_hidden_states") or getattr(module.config, "output_hidden_states", False):
            raise ValueError("SEOT patches the text encoder's last hidden state, but this call reads its hidden "
                             "layers (e.g. pipe(..., clip_skip=...)), which the patch cannot reach; call without "
                             "clip_skip")  # fmt: skip
        self._stash(index, new, hidden, changed)
        return _with_hidden(output, new, changed, ids, self.settings.eos_token_id)

    def _on_sdxl_text(self, index, module, args, kwargs, output):
        """SDXL: the penultimate state (what the UNet's context holds), and for the projected encoder the last state
        and the pooled embedding made from its EOS row."""
        ids = args[0] if args else kwargs.get("input_ids")
        states = getattr(output, "hidden_states", None)
        if ids is None or states is None:
            return None  # not a conditioning read: SDXL's UNet is given penultimate states
        penultimate = states[-2]
        new, changed = suppress(penultimate, ids, self.settings)
        if not changed:
            return None
        output.hidden_states = (*states[:-2], new, states[-1])
        pooled = getattr(output, "text_embeds", None)
        if pooled is not None:
            last, _ = suppress(output.last_hidden_state, ids, self.settings)
            output.last_hidden_state = last
            output.text_embeds = pooled.clone()
            for b, _ in changed:
                where = (ids[b] == self.settings.eos_token_id).nonzero().flatten().tolist()
                if where:
                    output.text_embeds[b] = module.text_projection(last[b, where[0]])
        self._stash(index, new, penultimate, changed, pooled)
        return output

    def _on_unet(self, module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        states = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if timestep is None or states is None or states.dim() != 3:
            return None
        t = torch.as_tensor(timestep).flatten().to("cpu")
        if t.numel() not in (1, states.shape[0]):
            return None
        early = torch.nonzero((t >= self.threshold).expand(states.shape[0])).flatten().tolist()
        added = kwargs.get("added_cond_kwargs") or {}
        restored, pooled, start = None, None, 0
        for originals, width in zip(self._originals, self._widths, strict=True):
            columns, start = slice(start, start + width), start + width
            for b in early:
                found = originals.find(states[b, -1, columns])
                if found is None:
                    continue
                restored = states.clone() if restored is None else restored
                restored[b, found.positions, columns] = found.rows.to(device=states.device, dtype=states.dtype)
                if found.pooled is not None and added.get("text_embeds") is not None:
                    pooled = added["text_embeds"].clone() if pooled is None else pooled
                    pooled[b] = found.pooled.to(device=pooled.device, dtype=pooled.dtype)
        if restored is None:
            return None
        if pooled is not None:
            kwargs = {**kwargs, "added_cond_kwargs": {**added, "text_embeds": pooled}}
        if len(args) > 2:
            return (*args[:2], restored, *args[3:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": restored}


def _with_hidden(output, hidden: torch.Tensor, changed: list[tuple[int, list[int]]], ids: torch.Tensor, eos: int):
    """The encoder's output with `hidden` as its last hidden state, and the pooled output (the EOS row) of the
    changed samples to match."""
    pooled = output[1] if len(output) > 1 else None
    if pooled is not None:
        pooled = pooled.clone()
        for b, _ in changed:
            where = (ids[b] == eos).nonzero().flatten().tolist()
            if where:
                pooled[b] = hidden[b, where[0]]
    if isinstance(output, tuple):
        return (hidden, *((pooled,) if pooled is not None else ()), *output[2:])
    output["last_hidden_state"] = hidden
    if pooled is not None:
        output["pooler_output"] = pooled
    return output


runtime.register(KIND, SEOTHook)
