import pytest
import torch

from kdsearch.config import KDConfig, OverlayConfig, TrainConfig, replace
from kdsearch.data.datasets import load_splits
from kdsearch.distill.attribution import Attribution, attribution_maps
from kdsearch.distill.teacher import cached_teacher_logits, load_teacher
from kdsearch.distill.train import train
from kdsearch.errors import CheckpointError, ConfigError
from kdsearch.infra.device import resolve_precision
from kdsearch.models.classifiers import weights_hash
from kdsearch.models.inference import accuracy, predict_logits
from tests.fakes import SYNTHETIC, TINY, TINY_STUDENT


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_kd_ig_training_returns_measured_metrics(student_config, tmp_path):
    epochs = []
    result = train(
        student_config, run_dir=tmp_path / "run", on_epoch=lambda epoch, row: epochs.append(row), progress=False
    )
    splits = load_splits(student_config.data, student_config.cache_dir)
    cpu = torch.device("cpu")
    assert result.val_acc == pytest.approx(accuracy(result.model, splits.val_images, splits.val_labels, 64, cpu, None))
    assert result.test_acc == pytest.approx(
        accuracy(result.model, splits.test_images, splits.test_labels, 64, cpu, None)
    )
    assert result.images_per_s > 0 and result.train_time_s > 0
    assert [row["epoch"] for row in epochs] == [1] and epochs[0]["val_acc"] == result.val_acc
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "last.pt").exists()
    assert result.maps_cache_key is not None and result.teacher_hash is not None


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(student_config, tmp_path):
    config = replace(student_config, epochs=2)
    straight = train(config, progress=False)

    def stop_after_first_epoch(epoch, row):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, run_dir=tmp_path / "run", on_epoch=stop_after_first_epoch, progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    # The first epoch's time is the checkpoint's: make it unmistakable in the resumed run's total.
    torch.save({**state, "train_time_s": state["train_time_s"] + 1000.0}, tmp_path / "run" / "last.pt")
    resumed = train(config, run_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.train_time_s > 1000.0 + state["train_time_s"]
    assert resumed.epochs_completed == 2 and [row["epoch"] for row in resumed.history] == [1, 2]
    assert weights_hash(resumed.model) == weights_hash(straight.model)
    assert resumed.val_acc == straight.val_acc


@pytest.mark.slow
def test_a_checkpoint_written_with_another_eval_batch_size_continues(student_config, tmp_path):
    config = replace(student_config, epochs=2)

    def stop_after_first_epoch(epoch, row):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(
            replace(config, eval_batch_size=500),
            run_dir=tmp_path / "run",
            on_epoch=stop_after_first_epoch,
            progress=False,
        )
    resumed = train(replace(config, eval_batch_size=64), run_dir=tmp_path / "run", resume=True, progress=False)
    assert [row["epoch"] for row in resumed.history] == [1, 2]  # epoch 1 came from the checkpoint


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_config(student_config, tmp_path):
    train(student_config, run_dir=tmp_path / "run", progress=False)
    other = replace(student_config, kd=KDConfig(alpha=0.9, temperature=2.0))
    with pytest.raises(CheckpointError, match="different configuration"):
        train(other, run_dir=tmp_path / "run", resume=True, progress=False)


@pytest.mark.slow
def test_a_retried_trial_discards_a_checkpoint_of_another_config_and_trains_afresh(student_config, tmp_path):
    train(student_config, run_dir=tmp_path / "run", progress=False)
    other = replace(student_config, kd=KDConfig(alpha=0.9, temperature=2.0))
    fresh = train(other, progress=False)
    retried = train(other, run_dir=tmp_path / "run", resume=True, discard_foreign_checkpoint=True, progress=False)
    assert [row["epoch"] for row in retried.history] == [1]
    assert weights_hash(retried.model) == weights_hash(fresh.model)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["config"]["kd"]["alpha"] == 0.9


@pytest.mark.slow
def test_an_ig_arm_sees_the_same_batches_crops_and_flips_as_its_baseline(student_config):
    # With p so small that no image is blended, an IG arm must train exactly like the arm without
    # IG: the overlay's random draws may not shift the data augmentation of the paired run.
    without_ig = train(replace(student_config, overlay=OverlayConfig(p=0.0)), progress=False)
    ig_never_blended = train(replace(student_config, overlay=OverlayConfig(p=1e-12)), progress=False)
    assert ig_never_blended.maps_cache_key is not None
    assert weights_hash(ig_never_blended.model) == weights_hash(without_ig.model)


@pytest.mark.slow
def test_each_image_is_overlaid_with_its_own_map_under_shuffling(student_config, monkeypatch):
    import kdsearch.distill.augment as augment_module

    recorded = []
    real_crop = augment_module.random_crop_flip

    def record(batch, *args, **kwargs):
        recorded.append(batch.clone())
        return real_crop(batch, *args, **kwargs)

    monkeypatch.setattr(augment_module, "random_crop_flip", record)
    result = train(replace(student_config, epochs=1), progress=False)
    splits = load_splits(student_config.data, student_config.cache_dir)
    from kdsearch.distill.attribution import ig_maps

    teacher = load_teacher(student_config, splits.num_classes, torch.device("cpu"))
    maps = ig_maps(teacher, splits, student_config.ig, student_config.cache_dir, torch.device("cpu"), False).tensors[
        "maps"
    ]
    pixels = splits.train_images.float() / 255
    batch = recorded[1]  # not the first batch: order is shuffled, so positions differ from indices
    for sample in range(batch.shape[0]):
        index = int(torch.nonzero((pixels == batch[sample, :3]).all(dim=(1, 2, 3))).flatten()[0])
        torch.testing.assert_close(batch[sample, 3], maps[index].float())
    assert result.epochs_completed == 1


@pytest.mark.slow
def test_the_overlay_blends_in_its_methods_maps_aligned_with_each_image(student_config, monkeypatch):
    import kdsearch.distill.augment as augment_module

    recorded = []
    real_crop = augment_module.random_crop_flip
    monkeypatch.setattr(
        augment_module, "random_crop_flip", lambda b, *a, **k: recorded.append(b.clone()) or real_crop(b, *a, **k)
    )
    config = replace(student_config, overlay=OverlayConfig(p=0.5, method="saliency"))
    result = train(config, progress=False)
    splits = load_splits(config.data, config.cache_dir)
    teacher = load_teacher(config, splits.num_classes, torch.device("cpu"))
    saliency = attribution_maps(teacher, splits, Attribution.of(config), config.cache_dir, torch.device("cpu"), False)
    assert result.maps_cache_key == saliency.path.name and saliency.meta["method"] == "saliency"
    pixels = splits.train_images.float() / 255
    batch = recorded[1]  # crop and flip take the image and its map as one stack, so they move together
    for sample in range(batch.shape[0]):
        index = int(torch.nonzero((pixels == batch[sample, :3]).all(dim=(1, 2, 3))).flatten()[0])
        torch.testing.assert_close(batch[sample, 3], saliency.tensors["maps"][index].float())


@pytest.mark.slow
def test_shuffled_mode_overlays_another_images_map(student_config, monkeypatch):
    import kdsearch.distill.augment as augment_module

    recorded = []
    real_crop = augment_module.random_crop_flip
    monkeypatch.setattr(
        augment_module, "random_crop_flip", lambda b, *a, **k: recorded.append(b.clone()) or real_crop(b, *a, **k)
    )
    config = replace(student_config, overlay=OverlayConfig(p=0.5, mode="shuffled"))
    train(config, progress=False)
    splits = load_splits(config.data, config.cache_dir)
    from kdsearch.distill.attribution import ig_maps

    teacher = load_teacher(config, splits.num_classes, torch.device("cpu"))
    maps = ig_maps(teacher, splits, config.ig, config.cache_dir, torch.device("cpu"), False).tensors["maps"]
    pixels = splits.train_images.float() / 255
    batch = recorded[0]
    own = 0
    for sample in range(batch.shape[0]):
        index = int(torch.nonzero((pixels == batch[sample, :3]).all(dim=(1, 2, 3))).flatten()[0])
        own += torch.equal(batch[sample, 3].half(), maps[index])
    assert own == 0


@pytest.mark.slow
def test_cached_teacher_logits_are_the_teachers_clean_image_logits(student_config, monkeypatch):
    splits = load_splits(student_config.data, student_config.cache_dir)
    teacher = load_teacher(student_config, splits.num_classes, torch.device("cpu"))
    cached = cached_teacher_logits(teacher, splits, student_config.cache_dir, torch.device("cpu"))
    torch.testing.assert_close(cached, predict_logits(teacher, splits.train_images, 64, torch.device("cpu"), None))
    import kdsearch.distill.train as train_module

    indices, soft_targets = [], []
    real_batch, real_loss = train_module.training_batch, train_module.kd_loss
    monkeypatch.setattr(
        train_module, "training_batch", lambda i, index, *a: indices.append(index) or real_batch(i, index, *a)
    )
    monkeypatch.setattr(
        train_module, "kd_loss", lambda s, soft, *a: soft_targets.append(soft) or real_loss(s, soft, *a)
    )
    train(replace(student_config, kd=KDConfig(alpha=0.5, temperature=2.0, teacher_logits="cached")), progress=False)
    assert len(soft_targets) == len(indices) > 1
    for index, soft in zip(indices, soft_targets, strict=True):  # the clean images' logits, not a new forward
        torch.testing.assert_close(soft, cached[index])


@pytest.mark.slow
def test_baseline_needs_no_teacher(tmp_path):
    config = TrainConfig(
        data=SYNTHETIC,
        student=TINY_STUDENT,
        teacher=TINY,
        kd=KDConfig(alpha=0.0),
        overlay=OverlayConfig(p=0.0),
        epochs=1,
        batch_size=32,
        cache_dir=str(tmp_path),
    )
    result = train(config, progress=False)
    assert result.teacher_hash is None and result.maps_cache_key is None
    # The reported accuracies are the trained model's on the held-out splits, at the run's precision.
    splits = load_splits(config.data, config.cache_dir)
    cpu, dtype = torch.device("cpu"), resolve_precision(config.precision, torch.device("cpu"))
    assert result.val_acc == accuracy(result.model, splits.val_images, splits.val_labels, 500, cpu, dtype)
    assert result.test_acc == accuracy(result.model, splits.test_images, splits.test_labels, 500, cpu, dtype)
    assert result.history == [{**result.history[0], "epoch": 1, "val_acc": result.val_acc}]
    assert len(splits.val_labels) == 100 and len(splits.test_labels) == 100  # on the splits of SYNTHETIC


def test_kd_without_a_teacher_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="teacher checkpoint is needed"):
        TrainConfig(data=SYNTHETIC, kd=KDConfig(alpha=0.1), overlay=OverlayConfig(p=0.0))


@pytest.mark.slow
def test_training_learns_the_synthetic_task(student_config):
    result = train(replace(student_config, epochs=3), progress=False)
    assert result.val_acc > 30  # 10 classes: chance is 10 %
