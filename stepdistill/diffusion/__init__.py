"""The math apart from any network: noise processes, the denoiser adapters, ODE sampling."""

from . import packed  # noqa: F401  (registers the packed-token families: Flux, Qwen-Image)
