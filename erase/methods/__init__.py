"""The method registry: one row per method, saying what it is, what it touches and what it needs.

The CLI and the bench ask a method's row; they never branch on its name. Adding a method is one file in this
package, one row here and (for the benchmark) one entry in `canvas.method_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..backdoor import BackdoorConfig
from ..backdoor import make_loss as backdoor_loss
from ..config import MethodConfig
from ..context import RunContext
from ..runtime import Runtime
from ..train import LossFn
from . import advunlearn, ca, erasediff, esd, fmn, mace, rece, salun, scissorhands, seot, skd_cag, speed, spm, uce

KINDS = ("fine-tune", "closed-form", "inference-time", "adapter")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
INPUTS = ("concepts", "anchors", "images", "masks", "forget_images", "retain_images", "trigger", "captions")


@dataclass(frozen=True)
class MethodSpec:
    """What a method is. A fine-tuning method gives `make_loss(ctx) -> loss_fn` for the shared training loop, a
    closed-form one `edit(ctx)`, which changes `ctx.params` in place; an inference-time or adapter method
    `build(ctx) -> Runtime`, a patch (erase.runtime) that changes no weight of the base and is returned detached."""

    name: str
    config_cls: type[MethodConfig]
    kind: str
    summary: str
    inputs: tuple[str, ...]  # what the method needs from its user (or the benchmark), beyond its config's numbers
    components: tuple[str, ...] = ("unet",)
    make_loss: Callable[[RunContext], LossFn] | None = None
    edit: Callable[[RunContext], None] | None = None
    build: Callable[[RunContext], Runtime] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not set(self.components) <= set(COMPONENTS) or not set(self.inputs) <= set(INPUTS):
            raise ValueError(f"method {self.name!r}: components must be within {COMPONENTS}, inputs within {INPUTS}")
        hook = {"fine-tune": self.make_loss, "closed-form": self.edit}.get(self.kind, self.build)
        if hook is None:
            raise ValueError(f"method {self.name!r} of kind {self.kind!r} gives no implementation for its kind")

    @property
    def patches_at_runtime(self) -> bool:
        """Whether the method's result is a runtime patch (a hook or an adapter) rather than changed weights."""
        return self.kind in ("inference-time", "adapter")

    def needs(self, what: str) -> bool:
        return what in self.inputs

    @property
    def reads_images(self) -> bool:
        """Whether the method trains on dataset images (the bench then needs a data folder)."""
        return any(i.endswith("images") for i in self.inputs)


def _rows(*specs: MethodSpec) -> dict[str, MethodSpec]:
    return {spec.name: spec for spec in specs}


METHODS: dict[str, MethodSpec] = _rows(
    MethodSpec(
        "esd",
        esd.ESDConfig,
        "fine-tune",
        "Erased Stable Diffusion: negative-guidance fine-tuning",
        ("concepts",),
        make_loss=esd.make_loss,
    ),
    MethodSpec(
        "ca",
        ca.CAConfig,
        "fine-tune",
        "Concept Ablation: map a target concept onto an anchor concept",
        ("concepts", "anchors"),
        make_loss=ca.make_loss,
    ),
    MethodSpec(
        "salun",
        salun.SalUnConfig,
        "fine-tune",
        "Saliency Unlearning: relabel the forget set, masked",
        ("forget_images", "retain_images"),
        make_loss=salun.make_loss,
    ),
    MethodSpec(
        "erasediff",
        erasediff.EraseDiffConfig,
        "fine-tune",
        "EraseDiff: retain loss plus the forget constraint after K inner relabelling steps",
        ("forget_images", "retain_images"),
        make_loss=erasediff.make_loss,
    ),
    MethodSpec(
        "scissorhands",
        scissorhands.ScissorhandsConfig,
        "fine-tune",
        "Scissorhands: re-initialise the weights most sensitive to the forget set, then repair",
        ("forget_images", "retain_images"),
        make_loss=scissorhands.make_loss,
    ),
    MethodSpec(
        "advunlearn",
        advunlearn.AdvUnlearnConfig,
        "fine-tune",
        "AdvUnlearn: ESD on adversarial prefix prompts found by an inner attack, plus a retain loss (text encoder)",
        ("concepts",),
        components=("text_encoder", "text_encoder_2", "unet"),  # text encoders by default; UNet through `params`
        make_loss=advunlearn.make_loss,
    ),
    MethodSpec(
        "uce",
        uce.UCEConfig,
        "closed-form",
        "Unified Concept Editing: closed-form edit of cross-attention K/V",
        ("concepts",),
        edit=uce.edit,
    ),
    MethodSpec(
        "speed",
        speed.SPEEDConfig,
        "closed-form",
        "SPEED: closed-form K/V edit in the null space of the retained concepts (prior filtering and augmentation)",
        ("concepts",),
        edit=speed.edit,
    ),
    MethodSpec(
        "rece",
        rece.RECEConfig,
        "closed-form",
        "Reliable and Efficient Concept Erasure: UCE, then rounds erasing the embedding that regenerates the concept",
        ("concepts",),
        edit=rece.edit,
    ),
    MethodSpec(
        "fmn",
        fmn.FMNConfig,
        "fine-tune",
        "Forget-Me-Not: steer cross-attention away from the concept",
        ("concepts", "images"),
        make_loss=fmn.make_loss,
    ),
    MethodSpec(
        "mace",
        mace.MACEConfig,
        "closed-form",  # the result is K/V weights; edit() trains one LoRA per concept through ctx.train
        "Mass Concept Erasure: closed-form K/V refinement, one masked-attention LoRA per concept, closed-form fusion",
        ("concepts", "images", "masks"),
        edit=mace.edit,
    ),
    MethodSpec(
        "skd-cag",
        skd_cag.SKDCAGConfig,
        "fine-tune",
        "SKD-CAG: remove a backdoor trigger by self-distillation with cross-attention guidance",
        ("trigger", "captions"),
        make_loss=skd_cag.make_loss,
    ),
    MethodSpec(
        "seot",
        seot.SEOTConfig,
        "inference-time",
        "SuppressEOT: shrink the concept's and EOT embeddings' singular values at generation time (no weight changes)",
        ("concepts",),
        components=("text_encoder", "unet"),  # hooks on both (the UNet's for the early steps); no weight changes
        build=seot.build,
    ),
    MethodSpec(
        "spm",
        spm.SPMConfig,
        "adapter",
        "Concept Semi-Permeable Membrane: a rank-1 adapter gated by the prompt's similarity to the concept",
        ("concepts",),
        build=spm.build,
    ),
)

# Not erasers: they make test subjects (backdoored models). `erase.run` runs them like any method; `erase list` and
# `canvas bench` do not offer them.
FIXTURES: dict[str, MethodSpec] = _rows(
    MethodSpec(
        "badt2i",
        BackdoorConfig,
        "fine-tune",
        "BadT2I: inject a pixel or style backdoor (a test subject)",
        ("trigger", "images"),
        make_loss=backdoor_loss,
    ),
)


def available_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}") from None


def method_of(config: MethodConfig) -> MethodSpec:
    for spec in (*METHODS.values(), *FIXTURES.values()):
        if type(config) is spec.config_cls:
            return spec
    raise TypeError(f"{type(config).__name__} is not the config of a registered method ({', '.join(METHODS)})")
