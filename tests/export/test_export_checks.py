"""What export reads back is checked before anything is written: the student's config field by field,
the pipeline slot it goes into (network class, interface, process kind), the run's own config, and a
run that is still training. Each is one ExportError line, and the destination stays unwritten."""

import json
from pathlib import Path

import pytest
from test_export import make_student_folder

from stepdistill.cli import main
from stepdistill.errors import ExportError
from stepdistill.export import export
from stepdistill.models.spec import SPEC_FILE
from stepdistill.models.teachers import load_teacher
from stepdistill.training.run_folder import RunLock


@pytest.fixture(scope="module")
def sd_student(tmp_path_factory, tiny_pipelines):
    folder = tmp_path_factory.mktemp("students") / "student"
    make_student_folder(folder, load_teacher(tiny_pipelines["sd"]), "renoise", [999])
    return folder


@pytest.mark.parametrize("family,message", [
    ("sdxl", r"the student's UNet2DConditionModel does not fit .*cross_attention_dim"),
    ("pixel", r"the student is a UNet2DConditionModel but .*pipeline takes a UNet2DModel"),
    ("sd3", r"the student is a UNet2DConditionModel but .*pipeline takes a SD3Transformer2DModel"),
    ("dit", r"the student is a UNet2DConditionModel but .*pipeline takes a DiTTransformer2DModel"),
])
def test_a_student_is_refused_by_another_familys_pipeline(tmp_path, tiny_pipelines, sd_student, family, message):
    with pytest.raises(ExportError, match=message) as err:
        export(sd_student, tmp_path / "out", teacher=str(tiny_pipelines[family]))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value,message", [
    ("prediction_type", "bogus", r"prediction_type 'bogus' is not one of"),
    ("timesteps", [], r"timesteps must be a non-empty list of finite numbers, got \[\]"),
    ("timesteps", [999, "x"], r"timesteps must be a non-empty list of finite numbers"),
    ("guidance_scale", "two", r"guidance_scale must be a finite number or null, got 'two'"),
    ("process", None, r"process.kind must be 'vp' or 'flow', got None"),
    ("consistency", {"solver_steps": 0}, r"consistency must hold solver_steps"),
    ("sampler", "nope", r"sampler 'nope' is not one of"),
])
def test_a_broken_student_config_is_one_line_naming_the_field(tmp_path, tiny_pipelines, sd_student, field, value,
                                                             message):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(sd_student, student)
    spec = json.loads((student / SPEC_FILE).read_text())
    spec[field] = value
    (student / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ExportError, match=rf"student_config.json' is not a student config \({message}"):
        export(student, tmp_path / "out", teacher=str(tiny_pipelines["sd"]))
    assert not (tmp_path / "out").exists()


def test_a_flow_student_is_refused_by_a_vp_pipeline(tmp_path, tiny_pipelines, sd_student):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(sd_student, student)
    spec = json.loads((student / SPEC_FILE).read_text())
    spec["process"] = {**spec["process"], "kind": "flow",
                       "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}}
    (student / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ExportError, match=r"trained on a flow process but .*scheduler \(DDIMScheduler\) is vp"):
        export(student, tmp_path / "out", teacher=str(tiny_pipelines["sd"]))


@pytest.mark.parametrize("teacher", ["5", "[a, b]", "{path: x}"])
def test_a_run_config_naming_no_teacher_path_is_refused(tmp_path, sd_student, teacher):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sd_student, run / "student")
    (run / "config.yaml").write_text(f"method: dmd2\nteacher:\n  path: {teacher}\n")
    with pytest.raises(ExportError, match=r"config.yaml': teacher.path .* is not a pipeline folder or hub id"):
        export(run, tmp_path / "out")


def test_a_run_still_training_is_refused(tmp_path, tiny_pipelines, sd_student, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sd_student, run / "student")
    (run / "config.yaml").write_text(f"method: dmd2\nteacher:\n  path: {tiny_pipelines['sd']}\n")
    with RunLock(run):  # as a training process holds it
        assert main(["export", str(run), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"run '{run}' is still training (pid" in err[0]
    assert not (tmp_path / "out").exists()
    assert main(["export", str(run), str(tmp_path / "out")]) == 0  # once it has finished
    assert (Path(tmp_path / "out") / "model_index.json").is_file()
