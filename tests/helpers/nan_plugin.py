"""A plug-in distiller (by dotted path ``nan_plugin:NaNInjector``) that regresses the teacher like a
one-step student and makes the loss, or only the gradient, non-finite at chosen steps."""

from dataclasses import dataclass, field

import torch

from stepdistill.distillers import Distiller
from stepdistill.distillers.common import make_student, student_trainable
from stepdistill.distillers.losses import mse


@dataclass
class Options:
    lr: float = 1e-3
    nan_steps: list[int] = field(default_factory=list)  # 0-based steps whose update must be skipped
    where: str = "loss"  # "loss": a NaN loss; "grad": a finite loss whose gradient is NaN


class NaNInjector(Distiller):
    Options = Options

    def __init__(self, ctx, options):
        super().__init__(ctx, options)
        self.student = make_student(ctx, "nan_injector", "deterministic", [ctx.init.process.t_max])

    def trainables(self):
        return {"student": student_trainable(self.student, self.options.lr)}

    def loss(self, batch, iteration, update):
        proc = self.student.process
        t = torch.full((batch.size,), proc.t_max)
        x = batch.randn(batch.size, *self.ctx.teacher.sample_shape)
        with torch.no_grad():
            target = self.ctx.teacher.denoiser(x, t, batch.cond)
        pred = self.student.denoiser(x, t, batch.cond)
        loss = mse(pred, target)
        if iteration in self.options.nan_steps:
            if self.options.where == "loss":
                loss = loss * float("nan")
            else:  # sqrt of a negative number on the branch where() drops: finite value, NaN gradient
                s = pred.sum()
                loss = loss + torch.where(torch.tensor(False), torch.sqrt(-s.abs() - 1), 0 * s)
        return {"loss": loss}
