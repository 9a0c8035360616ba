"""A finished student as a stock diffusers pipeline folder (``stepdistill export``): the teacher's own
pipeline class with the student in place of its UNet / transformer and a stock scheduler set up to
run exactly the trained timesteps. ``schedulers`` picks the scheduler; ``pipeline`` writes the folder."""

from .pipeline import (
                       EXPORT_DIR,
                       SAMPLING_FILE,
                       add_arguments,
                       check_exportable,
                       export,
                       export_run,
                       run,
                       sampling_kwargs,
)
from .schedulers import check_student_network, scheduler_for

__all__ = ["EXPORT_DIR", "SAMPLING_FILE", "add_arguments", "check_exportable", "check_student_network", "export",
           "export_run", "run", "sampling_kwargs", "scheduler_for"]
