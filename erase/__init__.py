"""erase: concept erasure for Stable-Diffusion-shaped text-to-image models.

pipe = erase.load_pipeline("toy")
result = erase.run(pipe, erase.make_config("esd", preset="toy", concepts=["Pop Art style"]))
result.delta.save("runs/esd")
"""

__version__ = "0.1.0"

from .config import build_config  # noqa: E402
from .delta import Delta, fingerprint  # noqa: E402
from .methods import available_methods, get_method  # noqa: E402
from .methods.ca import CAConfig  # noqa: E402
from .methods.esd import ESDConfig  # noqa: E402
from .methods.fmn import FMNConfig  # noqa: E402
from .methods.salun import SalUnConfig  # noqa: E402
from .methods.skd_cag import SKDCAGConfig  # noqa: E402
from .methods.uce import UCEConfig  # noqa: E402
from .runner import Result, run  # noqa: E402


def make_config(method: str, preset: str | None = None, **values):
    """The config of `method`, from its defaults, a named preset, then `values`."""
    return build_config(get_method(method).config_cls, preset, **values)


def load_pipeline(source, **kwargs):
    """Load a pipeline: "toy", a diffusers folder, a single-file .safetensors or a .ckpt (see erase.pipeline)."""
    from .pipeline import load_pipeline as _load

    return _load(source, **kwargs)


__all__ = [
    "CAConfig", "Delta", "ESDConfig", "FMNConfig", "Result", "SKDCAGConfig", "SalUnConfig", "UCEConfig",
    "available_methods", "fingerprint", "load_pipeline", "make_config", "run",
]  # fmt: skip
