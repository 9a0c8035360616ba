"""A third-party distiller plugs in by dotted path, without editing the package."""

import sys
import textwrap

import torch

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    import torch

    from stepdistill.distillers import Distiller
    from stepdistill.distillers.common import make_student, student_trainable
    from stepdistill.distillers.losses import mse


    @dataclass
    class Options:
        lr: float = 1e-3


    class OneStepRegression(Distiller):
        """Regress the student's x0 at t_max onto the teacher's: a toy method from outside the package."""

        Options = Options
        calls = 0

        def __init__(self, ctx, options):
            super().__init__(ctx, options)
            self.student = make_student(ctx, "toy", "deterministic", [ctx.init.process.t_max])

        def trainables(self):
            return {"student": student_trainable(self.student, self.options.lr)}

        def loss(self, batch, iteration, update):
            type(self).calls += 1
            proc = self.student.process
            t = torch.full((batch.size,), proc.t_max)
            x = batch.randn(batch.size, *self.ctx.teacher.sample_shape)
            with torch.no_grad():
                target = self.ctx.teacher.denoiser(x, t, batch.cond)
            return {"loss": mse(self.student.denoiser(x, t, batch.cond), target)}
''')


def test_dotted_path_plugin_trains(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    from stepdistill.config import load_config
    from stepdistill.models.student import Student
    from stepdistill.training import Trainer

    cfg = load_config(None, ["method=my_plugin:OneStepRegression", "teacher.oracle.components=4",
                             "teacher.oracle.network_steps=50", f"train.output_dir={tmp_path}/run", "train.max_steps=5",
                             "train.batch_size=8", "train.report_to=none", "train.progress=false", "train.num_validation=8"])
    Trainer(cfg).fit()
    plugin = sys.modules["my_plugin"].OneStepRegression
    assert plugin.calls == 5
    student = Student.load(tmp_path / "run" / "student")
    assert student.spec.method == "toy"
    from stepdistill.models.nets import MLPDenoiser

    fitted = MLPDenoiser.from_pretrained(tmp_path / "run" / "oracle_network").state_dict()
    trained = student.model.state_dict()
    assert any(not torch.equal(fitted[k], trained[k]) for k in fitted)
