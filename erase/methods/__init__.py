"""The method registry: one row per method, name -> config class and erase function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import ca, esd, fmn, salun, skd_cag, uce


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    erase: Callable  # erase(ctx: RunContext) -> per-step losses ([] for closed-form methods)
    summary: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("esd", esd.ESDConfig, esd.erase, "Erased Stable Diffusion: negative-guidance fine-tuning"),
        MethodSpec("ca", ca.CAConfig, ca.erase, "Concept Ablation: map a target concept onto an anchor concept"),
        MethodSpec("salun", salun.SalUnConfig, salun.erase, "Saliency Unlearning: relabel the forget set, masked"),
        MethodSpec("uce", uce.UCEConfig, uce.erase, "Unified Concept Editing: closed-form edit of cross-attention K/V"),
        MethodSpec("fmn", fmn.FMNConfig, fmn.erase, "Forget-Me-Not: steer cross-attention away from the concept"),
        MethodSpec(
            "skd-cag",
            skd_cag.SKDCAGConfig,
            skd_cag.erase,
            "SKD-CAG: remove a backdoor trigger by self-distillation with cross-attention guidance",
        ),
    )
}


def available_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}") from None


def method_of(config) -> MethodSpec:
    for spec in METHODS.values():
        if type(config) is spec.config_cls:
            return spec
    raise TypeError(f"{type(config).__name__} is not the config of a registered method ({', '.join(METHODS)})")
