"""erase: concept erasure for Stable-Diffusion-shaped text-to-image models."""

__version__ = "0.1.0"
