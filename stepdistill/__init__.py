"""stepdistill: distil diffusion teachers into one-to-few-step students."""

from .diffusion.denoiser import Cond, Denoiser, register_adapter
from .diffusion.process import FlowProcess, NoiseProcess, VPProcess, process_from_scheduler_config

__version__ = "0.1.0"

__all__ = ["Cond", "Denoiser", "register_adapter", "FlowProcess", "NoiseProcess", "VPProcess",
           "process_from_scheduler_config", "__version__"]
