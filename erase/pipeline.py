"""Load a UNet2DConditionModel-based text-to-image pipeline (SD 1.x/2.x, SDXL) from any of the forms users hold.

Sources: the built-in "toy", a diffusers pipeline folder, or one CompVis/LDM-layout checkpoint (`.safetensors`, or a
legacy `.ckpt` read weights-only) together with a local diffusers folder giving the architecture. Nothing here
touches the network, and nothing unpickles code: a `.ckpt` goes through `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import zipfile
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from .conditioning import check_supported, install
from .convert import ConversionError, load_text_encoder_from_ldm, load_unet_from_ldm, load_vae_from_ldm
from .paths import TOY_ENV, toy_path

ACCEPTED = "'toy', a diffusers pipeline folder, a single-file .safetensors or a .ckpt checkpoint (with config=...)"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' loading bars and notices, for the CLIs and notebooks, which report
    their own progress; process-wide, as the libraries' own switches are."""
    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()


def _dtype_kwarg() -> str:
    """diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); use whichever it reads."""
    deprecation_utils = getattr(diffusers.utils, "deprecation_utils", None)
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | os.PathLike | None = None,
) -> DiffusionPipeline:
    """Load a pipeline for erasure, with explicit dtype and device and the safety checker off.

    `source` is "toy", a diffusers pipeline folder, or a CompVis/LDM single-file checkpoint (`.safetensors` or a
    weights-only `.ckpt`); a single file needs `config=`, a local diffusers pipeline folder (weights optional) that
    gives the architecture, tokenizer and scheduler, because we never ask the hub.
    """
    dtype, device = _check_dtype_device(dtype, device)
    label = str(source)
    if isinstance(source, str) and source == "toy":
        if config is not None:
            raise ValueError("config= applies only to single-file checkpoints, not to 'toy'")
        folder = toy_path()
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"'toy': the built-in toy pipeline is not at {folder} (no model_index.json there); build it with "
                f"`python scripts/build_toy.py`, or set {TOY_ENV} to its folder"
            )
        return _load_folder(folder, "toy", dtype, device)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {label!r} does not exist; expected {ACCEPTED}")
    if path.is_dir():
        if config is not None:
            raise ValueError(f"config= applies only to single-file checkpoints, not to the folder {label!r}")
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"{label!r} is a folder without model_index.json, so not a diffusers pipeline; expected {ACCEPTED}"
            )
        return _load_folder(path, label, dtype, device)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{label!r} has an unknown suffix {path.suffix!r}; expected {ACCEPTED}")
    if config is None:
        raise ValueError(
            f"{label!r} is a single-file checkpoint and needs config=<local diffusers pipeline folder> giving its "
            "architecture (e.g. a saved SD 1.5 or 2.1 pipeline; weights there are not used); the hub is never asked"
        )
    return _load_single_file(path, label, Path(config).expanduser(), dtype, device)


def _check_dtype_device(dtype: torch.dtype, device: str | torch.device) -> tuple[torch.dtype, torch.device]:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch.dtype (torch.float32, torch.float16, torch.bfloat16), got {dtype!r}"
        )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here")
    return dtype, device


def _pipeline_class(folder: Path, label: str) -> tuple[type[DiffusionPipeline], dict]:
    """The pipeline class a folder's model_index.json names, checked to be UNet2DConditionModel-based."""
    try:
        index = DiffusionPipeline.load_config(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{label!r}: cannot read {folder / 'model_index.json'} ({err})") from err
    name = index.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise ValueError(f"{label!r}: model_index.json names pipeline class {name!r}, which diffusers does not have")
    if "Img2Img" in str(name) or "Inpaint" in str(name) or "text_encoder" not in index:
        raise ValueError(f"{label!r}: {name} is not a text-to-image base pipeline (an SDXL refiner has no "
                         "text_encoder); accepted: SD 1.x/2.x and SDXL text-to-image pipelines")  # fmt: skip
    unet = index.get("unet")
    if not (isinstance(unet, list | tuple) and len(unet) == 2 and unet[1] == UNet2DConditionModel.__name__):
        raise ValueError(
            f"{label!r}: {name} has no UNet2DConditionModel (unet entry: {unet!r}); only UNet2DConditionModel-based "
            "text-to-image pipelines (SD 1.x, 2.x, SDXL) are supported"
        )
    return cls, index


def _safety_off_kwargs(cls: type[DiffusionPipeline]) -> dict:
    """Keyword arguments that switch the safety checker off, for the pipelines that have one."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict = {}
    if "safety_checker" in accepted:
        kwargs["safety_checker"] = None
    if "requires_safety_checker" in accepted:
        kwargs["requires_safety_checker"] = False
    return kwargs


def _finish(pipe: DiffusionPipeline, dtype: torch.dtype, device: torch.device) -> DiffusionPipeline:
    check_supported(pipe)
    install(pipe)  # SDXL: the UNet reads the pooled embedding packed into the prompt embedding
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            first = next(module.parameters(), None)
            # Cast only what differs: diffusers warns on every cast, even of modules already in place.
            if first is not None and (first.dtype != dtype or first.device != device):
                module.to(device=device, dtype=dtype)
            module.eval()
    return pipe


def _load_folder(folder: Path, label: str, dtype: torch.dtype, device: torch.device) -> DiffusionPipeline:
    cls, _ = _pipeline_class(folder, label)
    try:
        pipe = cls.from_pretrained(
            str(folder), local_files_only=True, **{_dtype_kwarg(): dtype}, **_safety_off_kwargs(cls)
        )
    except pickle.UnpicklingError as err:  # a .bin weights file whose pickle needs code: never run it
        raise ValueError(
            f"{label!r} refused: a component's .bin weights are not a weights-only pickle (it needs "
            "code to load); convert them to .safetensors in an environment you trust"
        ) from err
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{label!r}: could not load the diffusers pipeline folder ({err})") from err
    return _finish(pipe, dtype, device)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a single-file checkpoint; a `.ckpt` is unpickled weights-only, so it can never run code."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # header/format errors surface as several exception types
            raise ValueError(f"{str(path)!r} is not a readable .safetensors file ({err})") from err
    try:
        extra = {"mmap": True} if zipfile.is_zipfile(path) else {}
        obj = torch.load(path, map_location="cpu", weights_only=True, **extra)
    except pickle.UnpicklingError as err:
        message = str(err)
        needs_code = re.search(r"Unsupported (global|class)[^.\n]*", message, re.IGNORECASE)
        if needs_code:
            raise ValueError(
                f"{str(path)!r} refused: only weights-only checkpoints are accepted, and this pickle needs code to "
                f"load ({needs_code.group(0)}). Convert it to .safetensors in an environment you trust, then load that."
            ) from err
        raise ValueError(f"{str(path)!r} is not a readable .ckpt checkpoint (not a weights-only torch pickle)") from err
    except Exception as err:  # a corrupt pickle can fail in many ways (EOF, KeyError, IndexError, zip errors, ...)
        raise ValueError(f"{str(path)!r} is not a readable .ckpt checkpoint ({type(err).__name__}: {err})") from err
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style wrapping, sometimes nested
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise ValueError(f"{str(path)!r} holds no state dict of tensors (got {type(obj).__name__})")
    return tensors


def _load_single_file(
    path: Path, label: str, config: Path, dtype: torch.dtype, device: torch.device
) -> DiffusionPipeline:
    if not (config / "model_index.json").is_file():
        raise ValueError(f"config={str(config)!r} is not a diffusers pipeline folder (no model_index.json)")
    cls, index = _pipeline_class(config, f"config={config}")
    for part, library in (("vae", "diffusers"), ("text_encoder", "transformers")):
        entry = index.get(part)
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] == library):
            raise ValueError(f"config={str(config)!r}: model_index.json has no {library} {part} (got {entry!r})")
    checkpoint = read_checkpoint(path)
    try:
        with init_empty_weights():  # parameters come from the checkpoint; skip random init (buffers stay real)
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config), subfolder="unet"))
        load_unet_from_ldm(unet, checkpoint, dtype)
        vae_cls = getattr(diffusers, index["vae"][1])
        with init_empty_weights():
            vae = vae_cls.from_config(vae_cls.load_config(str(config), subfolder="vae"))
        load_vae_from_ldm(vae, checkpoint, dtype)
        encoders = {}  # SDXL: both text encoders, the second from the file's OpenCLIP tower
        for which, part in enumerate(p for p in ("text_encoder", "text_encoder_2") if p in index):
            text_cls = getattr(transformers, index[part][1])
            text_config = text_cls.config_class.from_pretrained(str(config / part), local_files_only=True)
            with init_empty_weights():
                encoders[part] = text_cls(text_config)
            load_text_encoder_from_ldm(encoders[part], checkpoint, dtype, which)
    except ConversionError as err:
        raise ValueError(f"{label!r} does not fit the CompVis/LDM layout of config={str(config)!r}: {err}") from err
    del checkpoint
    try:
        pipe = cls.from_pretrained(
            str(config),
            unet=unet,
            vae=vae,
            **encoders,
            local_files_only=True,
            **{_dtype_kwarg(): dtype},
            **_safety_off_kwargs(cls),
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"config={str(config)!r}: could not load the remaining pipeline parts ({err})") from err
    return _finish(pipe, dtype, device)
