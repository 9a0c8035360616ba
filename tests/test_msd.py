"""Multi-student distillation (stepdistill.msd): captions partitioned by k-means on the teacher's text
embedding, one student per partition, and the router that sends each caption to its student."""

import json
from pathlib import Path

import pytest
import torch

from stepdistill.config import ConfigError
from stepdistill.models.teachers import load_teacher
from stepdistill.msd import RoutedStudent, train_students

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red cube", "a blue cube", "a green cube on a table", "two cats", "three sleeping cats", "a cat on a mat"]


def test_each_caption_meets_the_student_of_its_cluster(tmp_path, tiny_pipelines):
    captions = tmp_path / "captions.csv"  # read through the data sources, as distill reads data.prompts
    captions.write_text("id,caption\n" + "".join(f'{i},"{c}"\n' for i, c in enumerate(CAPTIONS)))
    common = [f"teacher.path={tiny_pipelines['sd']}", f"data.prompts={captions}", "train.max_steps=2",
              "train.report_to=none", "train.progress=false", "train.checkpoint_every=100", "train.validate_every=100",
              "method_args.lr=1e-2"]
    out = train_students(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml", 2, tmp_path / "msd", common)
    routed = RoutedStudent.load(out)
    teacher = load_teacher(tiny_pipelines["sd"])
    parts = [json.loads((out / f"prompts_{j}.json").read_text()) for j in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(CAPTIONS) and all(parts)
    for j, part in enumerate(parts):  # the router agrees with the partition each student was trained on
        assert (routed.route(teacher.encode(part)[0]) == j).all(), (j, part)
    cond = teacher.encode(CAPTIONS)[0]
    noise = torch.randn(len(CAPTIONS), *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    x = routed.sample(noise, cond, generator=torch.Generator().manual_seed(5))
    which = routed.route(cond)
    g = torch.Generator().manual_seed(5)
    for j, student in enumerate(routed.students):
        rows = (which == j).nonzero().flatten()
        torch.testing.assert_close(x[rows], student.sample(noise[rows], cond[rows], generator=g))
    a, b = (s.sample(noise, cond, generator=torch.Generator().manual_seed(1)) for s in routed.students)
    assert not torch.allclose(a, b, atol=1e-4)  # two students, trained on different captions


def test_msd_refuses_real_images_and_too_few_captions(tmp_path, tiny_pipelines):
    cfg = ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml"
    with pytest.raises(ConfigError, match="data.images: MSD partitions the captions"):
        train_students(cfg, 2, tmp_path / "a", [f"teacher.path={tiny_pipelines['sd']}", f"data.images={tmp_path}"])
    with pytest.raises(ValueError, match="holds 1 distinct captions, fewer than --students 2"):
        train_students(cfg, 2, tmp_path / "b", [f"teacher.path={tiny_pipelines['sd']}", "data.prompts=[a cat]"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
