"""The math apart from any network: noise processes, the denoiser adapters, ODE sampling."""

from . import adapters, packed  # noqa: F401  (register the network adapters; packed: Flux, Qwen-Image)
