"""Multi-student distillation (stepdistill.msd): captions partitioned by k-means on the teacher's text
embedding, one student per partition, the real (image, caption) pairs following their captions, and the
router that sends each caption to its student."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stepdistill import msd
from stepdistill.config import ConfigError
from stepdistill.data.items import read_items
from stepdistill.models.teachers import load_teacher
from stepdistill.msd import RoutedStudent, condition_vectors, train_students
from stepdistill.testing.data_fixtures import image_of, write_coco, write_saved_dataset, write_webdataset

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red cube", "a blue cube", "a green cube on a table", "two cats", "three sleeping cats", "a cat on a mat"]
TINY_DMD2 = ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml"
PAIRED = CAPTIONS + ["two cats", "a red cube"]  # image i's caption; two captions have two images each
SHORT = ["train.max_steps=2", "train.report_to=none", "train.progress=false", "train.checkpoint_every=100",
         "train.validate_every=100", "method_args.lr=1e-2"]


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


def _pairs(folder: Path) -> Path:
    """Image i is the flat grey 30 * i with caption PAIRED[i]; half of them in a subfolder."""
    from PIL import Image

    for i, caption in enumerate(PAIRED):
        where = folder / ("more" if i >= 4 else "")
        where.mkdir(parents=True, exist_ok=True)
        Image.new("L", (20, 20), 30 * i).save(where / f"{i}.png")
        (where / f"{i}.txt").write_text(caption)
    return folder


def _pair_index(image) -> int:
    """Which image of _pairs this is (its flat grey value)."""
    value = np.asarray(image.convert("L"))
    i = int(value[0, 0]) // 30
    assert (value == 30 * i).all()
    return i


def _clusters(out: Path, sd, captions=PAIRED) -> dict:
    """Each caption's cluster, as the router sends it (the nearest centroid of router.json)."""
    teacher = load_teacher(sd)
    centroids = torch.tensor(json.loads((out / "router.json").read_text())["centroids"])
    unique = sorted(set(captions))
    return dict(zip(unique, torch.cdist(condition_vectors(teacher.encode(unique)[0]), centroids).argmin(1).tolist()))


@pytest.mark.parametrize("prompts", [None, ["a red cube", "a blue cube", "a green cube on a table", "two cats",
                                            "four sleeping dogs", "a yellow cube"]])
def test_each_student_gets_the_image_caption_pairs_whose_caption_is_in_its_cluster(tmp_path, tiny_pipelines,
                                                                                   monkeypatch, prompts):
    """The images follow their captions: student k reads exactly the pairs whose caption routes to k,
    each image with the caption it was paired with (clustered captions: the images' own, or data.prompts,
    where the images' other captions go to their nearest centroid)."""
    runs = []
    monkeypatch.setattr(msd, "train", runs.append)  # the students' run configs, not their training
    given = tmp_path / "prompts.json"
    given.write_text(json.dumps(prompts))
    out = train_students(TINY_DMD2, 2, tmp_path / "msd", [
        f"teacher.path={tiny_pipelines['sd']}", f"data.images={_pairs(tmp_path / 'pairs')}", "method_args.gan=true",
        f"data.prompts={given if prompts else 'null'}"])
    cluster = _clusters(out, tiny_pipelines["sd"], PAIRED + (prompts or []))
    assert len(runs) == 2 and all(cfg.method_args["gan"] for cfg in runs)
    seen = []
    for j, cfg in enumerate(runs):
        items = read_items(cfg.data, True, None)  # as the student's run reads its real items
        got = []
        for n in range(len(items)):
            i = _pair_index(items.image(n))
            assert items.captions[n] == PAIRED[i]  # the image paired with this caption, not another
            got.append(i)
        assert sorted(got) == [i for i, c in enumerate(PAIRED) if cluster[c] == j], (j, got, cluster)
        seen += got
        if prompts:  # the student's generation prompts: its cluster of data.prompts
            assert json.loads(Path(cfg.data.prompts).read_text()) == [c for c in prompts if cluster[c] == j]
        else:
            assert cfg.data.prompts is None
    assert sorted(seen) == list(range(len(PAIRED))) and all(cfg.data.images for cfg in runs)
    assert len({cluster[c] for c in PAIRED}) == 2  # both clusters hold images


def test_a_coco_caption_file_is_partitioned_by_annotation(tmp_path, tiny_pipelines, monkeypatch):
    """COCO: each annotation is one pair, so an image with captions in two clusters goes to both students,
    each time with that caption."""
    runs = []
    monkeypatch.setattr(msd, "train", runs.append)
    coco = write_coco(tmp_path / "coco", n_images=4, per_image=2)  # image k: captions "<k> ... view 0/1"
    out = train_students(TINY_DMD2, 2, tmp_path / "msd", [f"teacher.path={tiny_pipelines['sd']}", f"data.images={coco}",
                                                          "data.prompts=null", "method_args.gan=true"])
    captions = [a["caption"] for a in json.loads(coco.read_text())["annotations"]]
    cluster = _clusters(out, tiny_pipelines["sd"], captions)
    seen = []
    for j, cfg in enumerate(runs):
        items = read_items(cfg.data, True, None)
        for n in range(len(items)):
            k = int(items.captions[n].split()[0])  # the image this caption was written for
            assert items.image(n).getpixel((0, 0)) == image_of(k).getpixel((0, 0))
            assert cluster[items.captions[n]] == j
            seen.append(items.captions[n])
    assert sorted(seen) == sorted(captions)


def test_msd_refuses_sources_it_cannot_partition_and_too_few_captions(tmp_path, tiny_pipelines):
    sd = f"teacher.path={tiny_pipelines['sd']}"
    shards = write_webdataset(tmp_path / "wds", n=4, shards=1)
    with pytest.raises(ConfigError, match=r"data.images: MSD partitions the \(image, caption\) pairs of an image folder "
                                          r"or a COCO caption file; .* is webdataset shards"):
        train_students(TINY_DMD2, 2, tmp_path / "a", [sd, f"data.images={shards}"])
    saved = write_saved_dataset(tmp_path / "saved", n=4)
    with pytest.raises(ConfigError, match="is a saved datasets folder, which it cannot partition"):
        train_students(TINY_DMD2, 2, tmp_path / "a", [sd, f"data.images={saved}", "data.prompts=null"])
    bare = _pairs(tmp_path / "bare")
    for f in bare.rglob("*.txt"):
        f.unlink()
    with pytest.raises(ConfigError, match="partitions the images by their captions; the images of .* have none"):
        train_students(TINY_DMD2, 2, tmp_path / "a", [sd, f"data.images={bare}"])
    with pytest.raises(ValueError, match="holds 1 distinct captions, fewer than --students 2"):
        train_students(TINY_DMD2, 2, tmp_path / "a", [sd, "data.prompts=[a cat]"])
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="is not text-conditioned; MSD partitions captions"):
        train_students(TINY_DMD2, 2, tmp_path / "b", [f"teacher.path={tiny_pipelines['pixel_cls']}",
                                                      "teacher.null_label=5", "data.prompts=[a cat, two dogs]"])
    assert list((tmp_path / "b").iterdir()) == []  # not marked: a later run may use it


def test_msd_with_the_dmd2_gan_each_students_gan_sees_only_its_clusters_images(tmp_path, tiny_pipelines, monkeypatch,
                                                                               record_gan_logits):
    """A real msd run of DMD2 with its GAN head: each student's in-memory real set is exactly its
    cluster's images, and every row its classifier sees (real images and fakes) is conditioned on a
    caption of its cluster."""
    from PIL import Image

    import stepdistill.training.build as build

    loaded, started = [], []
    load_images = build.load_images
    monkeypatch.setattr(build, "load_images", lambda files, *a, **k: (loaded.append(list(files)), load_images(files, *a, **k))[1])
    with record_gan_logits() as calls:
        real_train = msd.train
        monkeypatch.setattr(msd, "train", lambda cfg: (started.append(len(calls)), real_train(cfg))[1])
        out = train_students(TINY_DMD2, 2, tmp_path / "msd", [
            f"teacher.path={tiny_pipelines['sd']}", f"data.images={_pairs(tmp_path / 'pairs')}", "data.prompts=null",
            "method_args.gan=true", *SHORT])
    cluster = _clusters(out, tiny_pipelines["sd"])
    routed = RoutedStudent.load(out)
    assert len(loaded) == 2 and len(started) == 2

    for j, files in enumerate(loaded):
        got = []
        for f in files:
            with Image.open(f) as im:
                got.append(_pair_index(im))
        assert sorted(got) == [i for i, c in enumerate(PAIRED) if cluster[c] == j]
        mine = calls[started[j]:started[j + 1] if j + 1 < len(started) else len(calls)]
        assert mine, "the GAN head never ran"
        for _, cond in mine:  # every classifier row: a caption of this student's cluster
            assert (routed.route(cond) == j).all()
    assert all((out / f"student_{j}" / "student").is_dir() for j in range(2))
