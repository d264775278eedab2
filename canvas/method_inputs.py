"""What each method needs from the benchmark for one target: the concept's words, and for data-driven methods the
dataset images of the split's roles (UnlearnCanvas: forget/retain = indices 1-3, FMN reference = index 1).

Methods know nothing about the benchmark; this table is the one place that maps a target to their inputs. Values
given by the user (bench `overrides`) win over these. A style-object combination (`Pop_Art:Cats`, canvas.combination)
gets its inputs from what each method's registry row declares (`combination_inputs`), not from this table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from canvas import splits, toy
from canvas.combination import Combination, anchor_text, combination_text, kept_cells
from erase import get_method
from erase.catalog import Catalog, style_words


def concept_text(cat: Catalog, target: str) -> str:
    """How a target is named to a method that erases text, as UnlearnCanvas names it: `Pop Art style` for a style,
    the object for an object (the toy's text encoder learned these short forms with the template:
    scripts/build_toy.py STYLE_FORMS, OBJECT_FORMS)."""
    words = target_words(cat, target)
    return f"{words} style" if cat.is_style(target) else target


def target_words(cat: Catalog, target: str) -> str:
    """The target's own words inside the benchmark prompt: `Pop Art` for a style, the object for an object."""
    return style_words(target, cat.photo) if cat.is_style(target) else target


def _items(cat: Catalog, target: str, indices, forget: bool) -> list[tuple[str, str, int]]:
    """(theme, object, index) of the target's images (forget) or of everything else (retain)."""
    style = cat.is_style(target)
    return [
        (t, o, i)
        for t in cat.themes
        for o in cat.objects
        for i in indices
        if ((t == target) if style else (o == target)) == forget
    ]


def _files(root: Path, items) -> list[str]:
    return [str(root / t / o / f"{i}.jpg") for t, o, i in items]


def _other_object(cat: Catalog, obj: str) -> str:
    return cat.objects[(cat.objects.index(obj) + 1) % len(cat.objects)]


def esd_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """ESD: as UnlearnCanvas prompts it (mu_erasing_concepts_esd), `{Style} Style` for a style and `An image of
    {Object}.` for an object."""
    if cat.is_style(target):
        return concept_inputs(cat, target, data_root, given)
    return {"concepts": [f"An image of {target}."]}


def concept_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Methods that erase text: the target's concept text."""
    return {"concepts": [concept_text(cat, target)]}


def seot_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """SEOT: the text UnlearnCanvas's seot.py suppresses, the style's words plus "style" (`Pop Art style`, its token
    positions 5..) or the object (position 2); SEOT finds these tokens inside each benchmark prompt by content, and
    is given the target's answer prompts so that one it would not find is an error, not a silent UA of 0."""
    if cat.is_style(target):
        prompts = [cat.prompt(target, o) for o in cat.objects]
    else:
        prompts = [cat.prompt(t, target) for t in cat.themes]
    return {**concept_inputs(cat, target, data_root, given), "prompts": prompts}


def advunlearn_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """AdvUnlearn: the target's concept text, and as retain prompts (the authors' coco_object prompt set is not part
    of the benchmark) every catalog prompt of the other styles (a style) or the other objects (an object)."""
    style = cat.is_style(target)
    retain = [cat.prompt(t, o) for t in cat.themes for o in cat.objects if (t if style else o) != target]
    return {**concept_inputs(cat, target, data_root, given), "retain_prompts": retain}


def _is_unlearncanvas(cat: Catalog) -> bool:
    """Whether `cat` is the real benchmark, whose methods follow UnlearnCanvas's released recipes (the toy keeps the
    inputs its presets were measured with)."""
    return cat.name.startswith("unlearncanvas")


def fmn_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """FMN: the target's words, its reference images (split role fmn_reference) and prompts: on UnlearnCanvas its
    train_attn.py's one prompt ("an image in {c} Style" / "a {c} image"), on the toy every benchmark prompt."""
    style = cat.is_style(target)
    if _is_unlearncanvas(cat):
        prompts = ["an image in {concept} Style"] if style else ["a {concept} image"]
    elif style:
        prompts = [cat.template.format(object=o, style="{concept}") for o in cat.objects]
    else:
        prompts = [cat.template.format(object="{concept}", style=style_words(t, cat.photo)) for t in cat.themes]
    images = _files(data_root, _items(cat, target, splits.load().fmn_reference, forget=True))
    return {"concepts": [target_words(cat, target)], "images": images, "prompts": prompts}


def ca_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """CA: styles map to the photo class, objects to the next object; the anchor captions are CA's `anchor_form`
    over the catalog (the photo class with every object, the anchor object in every theme), not the benchmark
    prompts the answer set is generated from (a caption file or list given in `overrides` wins)."""
    if cat.is_style(target):
        inputs = {"concepts": [target_words(cat, target)], "anchors": [style_words(cat.photo, cat.photo)]}
    else:
        inputs = {"concepts": [target], "anchors": [_other_object(cat, target)]}
    return {**inputs, "anchor_catalog": cat.name}


def relabel_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Methods that relabel forget images and keep retain images (SalUn, EraseDiff, Scissorhands): forget images of
    the split role forget_retain (the target's), relabelled as photo (a style) or as the next object (an object).
    Retain images: on UnlearnCanvas its recipes' (mu_saliency_unlearn_salun, mu_erase_diff_ediff and
    mu_scissorhands_shs share generate_dataset.py and the run scripts: the photo class's images for a style, the
    next object's images for an object, each forget image's pseudo prompt the matching retain prompt); on the toy
    every other image. (Scissorhands' SNIP pass uses the forget prompts, train-erase.py:63-72: no mask prompt.)"""
    roles = splits.load()
    style = cat.is_style(target)
    forget = _items(cat, target, roles.forget_retain, forget=True)
    pseudo = [cat.prompt(cat.photo, o) if style else cat.prompt(t, _other_object(cat, o)) for t, o, _ in forget]
    if _is_unlearncanvas(cat):
        indices = roles.forget_retain
        if style:  # in the forget images' order, so retain prompt k is forget image k's pseudo prompt
            retain = [(cat.photo, o, i) for o in cat.objects for i in indices]
        else:
            retain = [(t, _other_object(cat, target), i) for t in cat.themes for i in indices]
    else:
        retain = _items(cat, target, roles.forget_retain, forget=False)
    return {
        "forget_images": _files(data_root, forget),
        "forget_prompts": [cat.prompt(t, o) for t, o, _ in forget],
        "pseudo_prompts": pseudo,
        "retain_images": _files(data_root, retain),
        "retain_prompts": [cat.prompt(t, o) for t, o, _ in retain],
    }


def salun_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """SalUn: the relabelling inputs, and on UnlearnCanvas its mask prompt "An image in {target} Style."
    (generate_mask.py:143, the name as given)."""
    inputs = relabel_inputs(cat, target, data_root, given)
    if _is_unlearncanvas(cat):
        inputs["mask_prompts"] = f"An image in {target} Style."
    return inputs


def spm_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """SPM: on UnlearnCanvas its recipe's target text, the bare folder name for styles and objects alike
    (mu_semipermeable_membrane_spm/configs/<target>/prompt.yaml: `Van_Gogh`, `Dogs`); on the toy the short forms its
    text encoder learned (`Pop Art style`, `Cats`), as for the other text-erasing methods."""
    if _is_unlearncanvas(cat):
        return {"concepts": [target]}
    return concept_inputs(cat, target, data_root, given)


def speed_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """SPEED: the concept text, and as priors (its retain set) every other style and object of the catalog named the
    same way (`Watercolor style`, `Cats`), as the paper retains other concepts' names (its style.csv, instance.csv).
    UnlearnCanvas has no SPEED recipe; this is our choice for both catalogs."""
    others = [concept_text(cat, t) for t in (*cat.styles, *cat.objects) if t != target]
    return {**concept_inputs(cat, target, data_root, given), "preserve": others}


def mace_inputs(cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """MACE: the target's words, its reference images (split role fmn_reference: the style with every object, or the
    object in every theme; MACE's recipe trains on 8 images per concept) and, for an object, one mask per image. On
    the toy the masks are the renderer's exact object masks (canvas.toy.mask_image, written once beside the data
    folder) and the prompts every benchmark prompt of the target, refined towards the photo class (a style) or the
    object's word removed (an object); the preserve prompts are every other catalog prompt. On UnlearnCanvas there are
    no masks (MACE derives them from the model's cross-attention) and the prompts are the released templates, a
    style mapped to 'art' (the art config's mapping) and an object's word removed."""
    style = cat.is_style(target)
    items = _items(cat, target, splits.load().fmn_reference, forget=True)
    words = target_words(cat, target)
    inputs: dict[str, Any] = {
        "concepts": [words],
        "kinds": ["style" if style else "object"],
        "images": [_files(data_root, items)],
    }  # one list of files per concept; fmt: skip
    if _is_unlearncanvas(cat) or cat.name != "toy":
        return {**inputs, "mappings": ["art" if style else ""]}
    if style:
        prompts = [cat.template.format(object=o, style="{concept}") for o in cat.objects]
    else:
        prompts = [cat.template.format(object="{concept}", style=style_words(t, cat.photo)) for t in cat.themes]
        indices = sorted({i for *_, i in items})
        mask_root = toy.export_masks(data_root.parent / f"{data_root.name}-masks", [target], indices)
        inputs["masks"] = [[str(mask_root / o / f"{i}.png") for _, o, i in items]]
    keep = [cat.prompt(t, o) for t in cat.themes for o in cat.objects if (t if style else o) != target]
    mapping = style_words(cat.photo, cat.photo) if style else ""
    return {**inputs, "prompts": prompts, "mappings": [mapping], "domain_preserve": keep}


def backdoor_removal_inputs(
    cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any]
) -> dict[str, Any]:
    """Backdoor removal (skd-cag): its target is a trigger, not a style or object, so the trigger must be given
    (bench `overrides: {skd-cag: {trigger: ...}}`, with a backdoored --model); the bench target then only names the
    job, and its UA/IRA/CRA measure clean fidelity. Captions default to the catalog's prompts (label order)."""
    if not given.get("trigger"):
        raise ValueError(
            "skd-cag removes a backdoor trigger, not a style or object: give it in the bench config as "
            "overrides: {skd-cag: {trigger: 'New Trigger'}} and a backdoored --model; the target only names the job"
        )
    if given.get("captions") or given.get("captions_file"):
        return {}
    return {"captions": [cat.prompt(t, o) for t in cat.themes for o in cat.objects]}


InputsFn = Callable[[Catalog, str, Path | None, Mapping[str, Any]], dict[str, Any]]

# One entry per registered method (tests/unit/test_method_inputs.py checks that none is missing).
INPUTS: dict[str, InputsFn] = {
    "esd": esd_inputs,
    "uce": concept_inputs,
    "rece": concept_inputs,
    "fmn": fmn_inputs,
    "ca": ca_inputs,
    "salun": salun_inputs,
    "erasediff": relabel_inputs,
    "scissorhands": relabel_inputs,
    "skd-cag": backdoor_removal_inputs,
    "seot": seot_inputs,
    "spm": spm_inputs,
    "speed": speed_inputs,
    "mace": mace_inputs,
    "advunlearn": advunlearn_inputs,
}


def method_inputs(
    method: str, cat: Catalog, target: str, data_root: Path | None, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Config values for `method` erasing `target`: the method's entry, then the values the user gave (`given`,
    the bench's `overrides`), which win."""
    if method not in INPUTS:
        raise ValueError(
            f"method {method!r} has no benchmark inputs (an entry in canvas.method_inputs.INPUTS); "
            f"methods with inputs: {', '.join(INPUTS)}"
        )
    given = dict(given or {})
    return {**INPUTS[method](cat, target, data_root, given), **given}


# Inputs that are a set of texts to keep (SPEED's priors, MACE's domain prompts), not one item per concept.
KEPT_SETS = ("preserve", "domain_preserve")


def together_inputs(
    method: str, cat: Catalog, targets: list[str], data_root: Path | None, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Config values for `method` erasing all of `targets` in one run: each target's inputs merged. A value every
    target gives alike is kept once (one guide for all); lists that differ are joined in target order, so lists
    given per concept stay aligned with the concepts, except sets of texts to keep (`KEPT_SETS`), where the job keeps
    what every target keeps (each target's set leaves itself out, so none of the erased ones stays); any other
    difference cannot be merged (the method takes one such input per run) and is an error."""
    each = [method_inputs(method, cat, t, data_root, given) for t in targets]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for inputs in each for k in inputs):
        values = [inputs.get(key) for inputs in each]
        if all(v == values[0] for v in values):
            merged[key] = values[0]
        elif all(isinstance(v, list) for v in values):
            if key in KEPT_SETS:
                merged[key] = [item for item in values[0] if all(item in v for v in values[1:])]
            else:
                merged[key] = [item for v in values for item in v]
        else:
            raise ValueError(f"{method} cannot erase {', '.join(targets)} in one run: its input {key!r} differs "
                             f"between them ({values[0]!r} for {targets[0]}); accepted: inputs that are lists or "
                             "agree between the targets")  # fmt: skip
    return merged


# ---------------------------------------------------------------------------------------------------- combinations


def _combination_concepts(cat: Catalog, combo: Combination, data_root: Path | None, fields: set[str]) -> dict:
    return {"concepts": [combination_text(cat, combo)]}


def _combination_anchors(cat: Catalog, combo: Combination, data_root: Path | None, fields: set[str]) -> dict:
    """The anchor, and where the method spells anchor prompts (CA) that one prompt: with no catalog in between, the
    target prompt CA trains on is then the combination's own."""
    anchor = [anchor_text(cat, combo)]
    return {"anchors": anchor, **({"anchor_prompts": anchor} if "anchor_prompts" in fields else {})}


def _combination_images(cat: Catalog, combo: Combination, data_root: Path | None, fields: set[str]) -> dict:
    """Reference images: the one cell's images at the forget/retain indices (a style or object target's reference
    role takes one image per cell of its row or column; a combination has one cell), captioned by its prompt, the
    concept itself, where the method reads prompt templates (FMN, MACE)."""
    images = _files(_require_root(data_root), [(combo.style, combo.object, i) for i in splits.load().forget_retain])
    return {"images": images, **({"prompts": ["{concept}"]} if "prompts" in fields else {})}


def _combination_masks(cat: Catalog, combo: Combination, data_root: Path | None, fields: set[str]) -> dict:
    """No masks: the style covers the whole image, and a method that derives masks itself (MACE: from the original
    model's cross-attention to the concept's tokens, here the whole prompt) does so."""
    return {}


def _combination_forget(cat: Catalog, combo: Combination, data_root: Path | None, fields: set[str]) -> dict:
    """Forget = the combination's images, relabelled as the anchor (the object in the photo class)."""
    forget = [(combo.style, combo.object, i) for i in splits.load().forget_retain]
    return {
        "forget_images": _files(_require_root(data_root), forget),
        "forget_prompts": [combination_text(cat, combo)] * len(forget),
        "pseudo_prompts": [anchor_text(cat, combo)] * len(forget),
    }


def _combination_retain(cat: Catalog, combo: Combination, data_root: Path | None, fields: set[str]) -> dict:
    """Retain = the images sharing only the style or only the object (the style row, the object column)."""
    retain = [(t, o, i) for t, o in kept_cells(cat, combo) for i in splits.load().forget_retain]
    return {"retain_images": _files(_require_root(data_root), retain),
            "retain_prompts": [cat.prompt(t, o) for t, o, _ in retain]}  # fmt: skip


def _require_root(data_root: Path | None) -> Path:
    if data_root is None:
        raise ValueError("this method reads dataset images: give data_root, the <Theme>/<Object>/<idx>.jpg folder")
    return data_root


# How each input a method declares (erase.methods MethodSpec.inputs) is given for a combination; a method declaring
# any other input (a trigger, captions) cannot be pointed at a combination.
COMBINATION_INPUTS: dict[str, Callable[[Catalog, Combination, Path | None, set[str]], dict[str, Any]]] = {
    "concepts": _combination_concepts,
    "anchors": _combination_anchors,
    "images": _combination_images,
    "masks": _combination_masks,
    "forget_images": _combination_forget,
    "retain_images": _combination_retain,
}
# Config fields (not declared inputs) naming what the target is mapped to: UCE / RECE guides, SPEED anchors, MACE
# mappings; filled with the anchor where the field holds texts (SPM's `anchors` is a count).
ANCHOR_FIELDS = ("guides", "anchors", "mappings")
# Config fields holding texts to keep, in order of preference: the first one a method's config has gets the kept
# prompts (MACE's domain set before its COCO-like prior set, UCE / RECE / SPEED preserve, AdvUnlearn retain prompts).
KEPT_FIELDS = ("domain_preserve", "preserve", "retain_prompts")


def combination_inputs(
    method: str, cat: Catalog, combo: Combination, data_root: Path | None, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Config values for `method` erasing one style-object combination, from the inputs its registry row declares
    (COMBINATION_INPUTS), then the anchor (`anchor_text`) in an anchor field and the prompts to keep (the style on
    the other objects, the object in the other themes: `kept_cells`) in the first kept-set field its config has;
    the values the user gave (`given`) win. A method declaring an input no combination can give is a one-line
    error naming it."""
    spec = get_method(method)
    unsupported = [name for name in spec.inputs if name not in COMBINATION_INPUTS]
    if unsupported:
        raise ValueError(f"{method} cannot erase a style-object combination ({combo.name}): its inputs "
                         f"{', '.join(unsupported)} name no style or object; accepted: methods whose inputs are "
                         f"within {', '.join(COMBINATION_INPUTS)}")  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    values: dict[str, Any] = {}
    for name in spec.inputs:
        values.update(COMBINATION_INPUTS[name](cat, combo, data_root, set(fields)))
    for name in ANCHOR_FIELDS:
        if name in fields and name not in values and "list[str]" in str(fields[name].type):
            values[name] = [anchor_text(cat, combo)]
    kept = next((name for name in KEPT_FIELDS if name in fields), None)
    if kept is not None and kept not in values:
        values[kept] = [cat.prompt(t, o) for t, o in kept_cells(cat, combo)]
    return {**values, **dict(given or {})}
