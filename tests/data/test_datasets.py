import shutil
import time

import pytest
import torch
from torchvision.io import encode_jpeg

from kdsearch.config import DataConfig
from kdsearch.data.datasets import load_splits, stratified_holdout
from kdsearch.errors import ConfigError, DataError


def _write_folder(root, per_class=6, classes=("truck", "airplane", "cat")):
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in classes:
            directory = root / split / name
            directory.mkdir(parents=True)
            for index in range(per_class):
                image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
                (directory / f"{index:04d}.jpg").write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())
    return root


def test_holdout_is_stratified_deterministic_and_disjoint():
    labels = torch.arange(1000) % 10
    kept, held = stratified_holdout(labels, 100, seed=5)
    assert torch.bincount(labels[held]).tolist() == [10] * 10
    assert len(set(kept.tolist()) | set(held.tolist())) == 1000 and not set(kept.tolist()) & set(held.tolist())
    assert torch.equal(held, stratified_holdout(labels, 100, seed=5)[1])
    assert not torch.equal(held, stratified_holdout(labels, 100, seed=6)[1])


def test_holdout_quotas_sum_exactly_with_uneven_classes():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    _, held = stratified_holdout(labels, 4, seed=0)
    assert len(held) == 4 and set(torch.bincount(labels[held], minlength=3).tolist()) <= {1, 2}


def test_folder_classes_are_sorted_subfolder_names_and_cache_is_reused(tmp_path):
    root = _write_folder(tmp_path / "data")
    config = DataConfig(dataset="folder", data_dir=str(root), val_size=3)
    first = load_splits(config, tmp_path / "cache")
    assert first.classes == ["airplane", "cat", "truck"]
    assert first.sizes() == {"train": 15, "val": 3, "test": 18}
    assert torch.bincount(first.val_labels).tolist() == [1, 1, 1]
    assert (tmp_path / "cache" / "decoded").is_dir()
    second = load_splits(config, tmp_path / "cache")
    assert torch.equal(first.train_images, second.train_images) and first.fingerprint == second.fingerprint


def test_folder_cache_is_keyed_by_content(tmp_path):
    root = _write_folder(tmp_path / "data")
    config = DataConfig(dataset="folder", data_dir=str(root), val_size=3)
    before = load_splits(config, tmp_path / "cache").fingerprint
    time.sleep(0.01)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    (root / "train" / "cat" / "0000.jpg").write_bytes(encode_jpeg(image).numpy().tobytes())
    after = load_splits(config, tmp_path / "cache")
    assert after.fingerprint != before
    assert int(after.train_images.float().sum()) != 0


def test_a_copy_of_the_same_images_elsewhere_keeps_the_fingerprint(tmp_path):
    # A fresh checkout or a re-synced share has new paths and mtimes: the IG maps and teacher logits
    # keyed by the fingerprint must still be found.
    root = _write_folder(tmp_path / "data")
    original = load_splits(DataConfig(dataset="folder", data_dir=str(root), val_size=3), tmp_path / "cache")
    time.sleep(0.01)
    copy = shutil.copytree(root, tmp_path / "elsewhere")  # copytree keeps mtimes: touch every file
    for path in copy.rglob("*.jpg"):
        path.touch()
    copied = load_splits(DataConfig(dataset="folder", data_dir=str(copy), val_size=3), tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "decoded").glob("*/meta.json"))) == 2  # decoded again, then
    assert copied.fingerprint == original.fingerprint
    other_split = load_splits(DataConfig(dataset="folder", data_dir=str(copy), val_size=6), tmp_path / "cache")
    assert other_split.fingerprint != original.fingerprint


def test_train_subset_is_stratified_and_excludes_validation(tmp_path):
    config = DataConfig(dataset="synthetic", synthetic_size=400, val_size=100, train_subset=50)
    splits = load_splits(config, tmp_path)
    assert torch.bincount(splits.train_labels).tolist() == [5] * 10
    val_positions = set(range(400)) - set(splits.train_index.tolist())
    assert len(val_positions) == 350  # held-out + dropped, never trained on
    assert splits.train_index.tolist() == sorted(splits.train_index.tolist())


def test_missing_folder_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(dataset="folder", data_dir=str(tmp_path / "nope")), tmp_path)


def test_folder_without_train_and_test_is_refused(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="must contain train/ and test/"):
        load_splits(DataConfig(dataset="folder", data_dir=str(tmp_path / "flat")), tmp_path)


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"dataset must be one of \['cifar10', 'cifar100', 'folder', 'synthetic'\]"):
        DataConfig(dataset="imagenet")


def test_a_corrupt_image_is_named_and_leaves_no_cache_entry(tmp_path):
    root = _write_folder(tmp_path / "data")
    broken = root / "test" / "cat" / "0003.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    cache = tmp_path / "cache"
    (cache / "ig").mkdir(parents=True)  # the cache already holds other artefacts: they stay
    with pytest.raises(DataError, match=f"cannot decode image {broken}: Image is incomplete or truncated"):
        load_splits(DataConfig(dataset="folder", data_dir=str(root), val_size=3), cache)
    assert [path.name for path in cache.iterdir()] == ["ig"]


def test_inspect_sees_the_layout_without_decoding(tmp_path):
    from kdsearch.data.datasets import DATASETS, Layout

    root = _write_folder(tmp_path / "data")
    (root / "train" / "cat" / "0005.jpg").write_bytes(b"not decoded by inspect")  # not a class's first image
    layout = DATASETS["folder"]().inspect(DataConfig(dataset="folder", data_dir=str(root)), tmp_path)
    assert layout == Layout(classes=3, train_images=18, test_images=18)
    assert not (tmp_path / "decoded").exists()


def test_a_class_folder_without_images_is_refused_by_name(tmp_path):
    root = _write_folder(tmp_path / "data")
    for split in ("train", "test"):
        (root / split / "dog").mkdir()
    with pytest.raises(DataError, match=f"class folder {root / 'train' / 'dog'} has no images"):
        load_splits(DataConfig(dataset="folder", data_dir=str(root), val_size=3), tmp_path / "cache")


def test_a_missing_torchvision_dataset_asks_for_a_download(tmp_path):
    from kdsearch.data.datasets import DATASETS

    layout = DATASETS["cifar10"]().inspect(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), tmp_path)
    assert layout.classes == 10 and layout.download == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        tmp_path,
    )


def test_a_folder_of_images_of_many_sizes_is_fitted_to_the_image_size_as_it_is_decoded(tmp_path):
    root = tmp_path / "photos"
    sizes = [(40, 60), (50, 50), (64, 48)]
    for split in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            directory = root / split / name
            directory.mkdir(parents=True)
            for index, (height, width) in enumerate(sizes):
                image = torch.full((3, height, width), 60 * label + 20 * index, dtype=torch.uint8)
                (directory / f"{index}.jpg").write_bytes(encode_jpeg(image, quality=95).numpy().tobytes())
    with pytest.raises(DataError, match=r"differ in size .* give data.image_size"):
        load_splits(DataConfig(dataset="folder", data_dir=str(root), val_size=0), tmp_path / "cache")
    splits = load_splits(
        DataConfig(dataset="folder", data_dir=str(root), val_size=0, image_size=24), tmp_path / "cache"
    )
    assert splits.train_images.shape == (6, 3, 24, 24) and splits.image_size == 24
    # A flat image stays flat through the resize and the centre crop: dog's third image is 60 + 40.
    assert abs(splits.test_images[5].float().mean().item() - 100) < 2
