"""erase: concept erasure for Stable-Diffusion-shaped text-to-image models.

pipe = erase.load_pipeline("toy")
result = erase.run(pipe, erase.make_config("esd", preset="toy", concepts=["Pop Art style"]))
result.delta.save("runs/esd")
"""

from ._version import __version__
from .backdoor import BackdoorConfig
from .config import MethodConfig, TrainingConfig, build_config
from .context import RunContext
from .delta import Delta, fingerprint
from .methods import MethodSpec, available_methods, get_method
from .methods.ca import CAConfig
from .methods.esd import ESDConfig
from .methods.fmn import FMNConfig
from .methods.salun import SalUnConfig
from .methods.scissorhands import ScissorhandsConfig
from .methods.seot import SEOTConfig
from .methods.skd_cag import SKDCAGConfig
from .methods.speed import SPEEDConfig
from .methods.spm import SPMConfig
from .methods.uce import UCEConfig
from .pipeline import load_pipeline, quiet_libraries
from .runner import Result, run


def make_config(method: str, preset: str | None = None, **values) -> MethodConfig:
    """The config of `method`, from its defaults, a named preset, then `values`."""
    return build_config(get_method(method).config_cls, preset, **values)


__all__ = [
    "BackdoorConfig",
    "CAConfig",
    "Delta",
    "ESDConfig",
    "FMNConfig",
    "MethodConfig",
    "MethodSpec",
    "Result",
    "RunContext",
    "SEOTConfig",
    "SKDCAGConfig",
    "SPEEDConfig",
    "SPMConfig",
    "SalUnConfig",
    "ScissorhandsConfig",
    "TrainingConfig",
    "UCEConfig",
    "__version__",
    "available_methods",
    "fingerprint",
    "get_method",
    "load_pipeline",
    "make_config",
    "quiet_libraries",
    "run",
]
