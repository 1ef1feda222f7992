"""Datasets as uint8 tensors: decoded once into the artefact store, split deterministically.

Sources: ``cifar10`` / ``cifar100`` through torchvision (downloaded when missing), ``folder`` (a
directory with ``train/<class>/*`` and ``test/<class>/*``; classes are the sorted subfolder names), and
``synthetic`` (tiny, generated, for tests and smoke runs). The validation split is held out of the
training set (stratified, seeded) for model selection; the test set is only for final reporting.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kdsearch.config import DataConfig, Dataset, default_cache_dir
from kdsearch.errors import DataError
from kdsearch.infra.tensor_cache import META, TensorCache, content_key

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class Decoded:
    """A whole dataset in memory: images are (N, 3, H, W) uint8, labels int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


@dataclass
class Splits:
    label: str  # the dataset's display name, used in every report
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_index: torch.Tensor  # position of each training image in the source's training set (sorted)
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    fingerprint: (
        str  # identifies the content of the three splits (not the files' paths); keys IG maps and teacher logits
    )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_labels), "val": len(self.val_labels), "test": len(self.test_labels)}

    @property
    def image_size(self) -> int:
        """The side of the (square) images: 32 for CIFAR."""
        return self.train_images.shape[-1]


@dataclass(frozen=True)
class Layout:
    """What a source holds, known without decoding it."""

    classes: int
    train_images: int  # before the validation split
    download: tuple[str, Path] | None = None  # (URL, folder) that decode would download the source from/into
    test_images: int | None = None  # the test split's size, where known without decoding


@dataclass(frozen=True)
class Source:
    fingerprint: Callable[[DataConfig, Path], str]  # cheap identity of the raw files
    decode: Callable[[DataConfig, Path], Decoded]
    default_label: Callable[[DataConfig], str]
    # Without decoding (listings, image headers): raises DataError for a layout that decode would fail on.
    inspect: Callable[[DataConfig, Path], Layout]


def _torchvision_root(config: DataConfig, cache_dir: Path) -> Path:
    return Path(config.data_dir) if config.data_dir else cache_dir / "datasets"


def _torchvision_source(name: str) -> Source:
    import torchvision

    dataset_class = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    layout = {"cifar10": Layout(10, 50_000, test_images=10_000), "cifar100": Layout(100, 50_000, test_images=10_000)}[
        name
    ]

    def fingerprint(config: DataConfig, cache_dir: Path) -> str:
        return f"{name}:{_torchvision_root(config, cache_dir).resolve()}"

    def decode(config: DataConfig, cache_dir: Path) -> Decoded:
        root = _torchvision_root(config, cache_dir)
        try:
            train = dataset_class(str(root), train=True, download=True)
            test = dataset_class(str(root), train=False, download=True)
        except Exception as error:  # torchvision raises URLError, RuntimeError, OSError...
            raise DataError(
                f"could not load or download {name} into {root} ({type(error).__name__}: {error}); "
                "for a local copy use --dataset folder --data-dir DIR"
            ) from error

        def to_tensor(split):
            images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()
            return images, torch.tensor(split.targets, dtype=torch.int64)

        train_images, train_labels = to_tensor(train)
        test_images, test_labels = to_tensor(test)
        return Decoded(train_images, train_labels, test_images, test_labels, list(train.classes))

    def inspect(config: DataConfig, cache_dir: Path) -> Layout:
        root = _torchvision_root(config, cache_dir)
        extracted = [entry[0] for entry in dataset_class.train_list + dataset_class.test_list]
        present = all((root / dataset_class.base_folder / file).is_file() for file in extracted)
        if present or (root / dataset_class.filename).is_file():
            return layout
        return replace(layout, download=(dataset_class.url, root))

    return Source(
        fingerprint,
        decode,
        lambda config: {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name],
        inspect,
    )


def _subfolders(path: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    except OSError as error:
        raise DataError(f"cannot list {path}: {error.strerror}") from None


def folder_files(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """(class names, {"train"/"test": [(image path, label)]}) of a folder dataset, sorted; raises DataError
    for a layout that cannot be trained on: no train/ or test/, no classes, classes that differ between
    the splits, a class folder without images."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"data folder {root} must contain train/ and test/ subfolders")
    classes = _subfolders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class subfolders (expected train/<class>/*.jpg)")
    test_classes = _subfolders(root / "test")
    if test_classes != classes:
        missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise DataError(f"{root / 'test'} has other classes than train/: missing {missing}, extra {extra}")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        files[split] = []
        for label, name in enumerate(classes):
            try:
                entries = sorted(os.scandir(root / split / name), key=lambda e: e.name)
            except OSError as error:
                raise DataError(f"cannot list {root / split / name}: {error.strerror}") from None
            images = [(Path(e.path), label) for e in entries if Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise DataError(
                    f"class folder {root / split / name} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files[split] += images
    return classes, files


def _folder_inspect(config: DataConfig, cache_dir: Path) -> Layout:
    """The listing, and the header size of the first image of each class in each split: a folder of
    mixed sizes is refused before anything is decoded (decode still checks every image)."""
    from PIL import Image

    root = Path(config.data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    classes, files = folder_files(root)
    sizes: dict[tuple[int, int], Path] = {}
    for split in ("train", "test"):
        firsts: dict[int, Path] = {}
        for path, label in files[split]:
            firsts.setdefault(label, path)
        for path in firsts.values():
            try:
                with Image.open(path) as image:
                    sizes.setdefault(image.size, path)
            except OSError as error:  # PIL's UnidentifiedImageError included
                raise DataError(f"cannot read image {path}: {error}") from None
    if len(sizes) > 1:
        (first_size, first), (other_size, other) = list(sizes.items())[:2]
        raise DataError(
            f"images in {root} differ in size: {first} is {first_size[0]}x{first_size[1]}, "
            f"{other} is {other_size[0]}x{other_size[1]}; resize them to one size first"
        )
    return Layout(len(classes), len(files["train"]), test_images=len(files["test"]))


def _folder_fingerprint(config: DataConfig, cache_dir: Path) -> str:
    root = Path(config.data_dir).resolve()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    _, files = folder_files(root)
    digest = hashlib.sha256(str(root).encode())
    for split in ("train", "test"):
        for path, label in files[split]:
            stat = path.stat()
            digest.update(f"{split}/{label}/{path.name}/{stat.st_size}/{stat.st_mtime_ns}\n".encode())
    size = f":{config.image_size}px" if config.image_size is not None else ""
    return f"folder:{digest.hexdigest()}{size}"


def _decode_file(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        # torchvision prefixes its reason with "function, source.cpp:line, ".
        reason = re.sub(r"^\w+, \S+:\d+, ", "", str(error).strip().splitlines()[0])
        raise DataError(f"cannot decode image {path}: {reason}; replace or remove it") from None


def centre_fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 (3, H, W) image resized so its shorter side is ``size``, then its centre ``size`` x ``size``
    (torchvision's Resize + CenterCrop, as evaluation on ImageNet-style data does)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])


def _folder_decode(config: DataConfig, cache_dir: Path) -> Decoded:
    from tqdm import tqdm

    root = Path(config.data_dir)
    classes, files = folder_files(root)
    decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split in ("train", "test"):
        log.info("decoding %d images of %s into the cache (once per dataset)", len(files[split]), root / split)
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of torchcodec (not a dependency);
            # they still work, and this runs once per dataset before the result is cached.
            warnings.simplefilter("ignore", DeprecationWarning)
            images = [
                _decode_file(path) if config.image_size is None else centre_fit(_decode_file(path), config.image_size)
                for path, _ in tqdm(files[split], desc=f"decoding {root.name}/{split}", unit="img", disable=None)
            ]
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1:
            raise DataError(
                f"images in {root / split} differ in size ({sorted(shapes)[:3]}...); give data.image_size "
                "(--set train.data.image_size=224) to resize them as they are decoded"
            )
        labels = torch.tensor([label for _, label in files[split]], dtype=torch.int64)
        decoded[split] = (torch.stack(images), labels)
    return Decoded(*decoded["train"], *decoded["test"], classes)


def _synthetic_fingerprint(config: DataConfig, cache_dir: Path) -> str:
    size = f":{config.image_size}px" if config.image_size is not None else ""
    return f"synthetic:{config.synthetic_size}{size}"


def _synthetic_decode(config: DataConfig, cache_dir: Path) -> Decoded:
    """Ten classes a tiny CNN separates within an epoch: a class colour plus a class stripe frequency."""
    generator = torch.Generator().manual_seed(1234)
    num_classes, size = 10, config.image_size or 32
    class_colours = torch.rand(num_classes, 3, 1, 1, generator=generator)

    def make(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(count) % num_classes
        colours = class_colours[labels]
        frequency = (labels + 1).float().view(-1, 1, 1, 1)
        stripes = torch.sin(torch.linspace(0, 3.1416, size).view(1, 1, 1, size) * frequency) * 0.5 + 0.5
        noise = torch.rand(count, 3, size, size, generator=generator) * 0.3
        images = (0.5 * colours + 0.35 * stripes + noise).clamp(0, 1)
        return (images * 255).round().to(torch.uint8), labels.to(torch.int64)

    classes = [f"class{index}" for index in range(num_classes)]
    return Decoded(*make(config.synthetic_size), *make(config.synthetic_size // 4), classes)


DATASETS: dict[Dataset, Callable[[], Source]] = {
    Dataset.CIFAR10: lambda: _torchvision_source("cifar10"),
    Dataset.CIFAR100: lambda: _torchvision_source("cifar100"),
    Dataset.FOLDER: lambda: Source(
        _folder_fingerprint, _folder_decode, lambda config: Path(config.data_dir).name, _folder_inspect
    ),
    Dataset.SYNTHETIC: lambda: Source(
        _synthetic_fingerprint,
        _synthetic_decode,
        lambda config: "synthetic",
        lambda config, cache_dir: Layout(10, config.synthetic_size, test_images=config.synthetic_size // 4),
    ),
}


def load_decoded(config: DataConfig, cache_dir: str | Path | None = None) -> tuple[Decoded, str]:
    """The whole dataset, decoded once and kept in the artefact store; returns it and its content digest."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = DATASETS[config.dataset]()
    if config.dataset == "synthetic":  # generating is cheaper than a cache round trip
        decoded = source.decode(config, cache_dir)
        return decoded, content_digest(decoded)

    def build(scratch: Path):
        decoded = source.decode(config, cache_dir)
        tensors = {
            "train_images": decoded.train_images,
            "train_labels": decoded.train_labels,
            "test_images": decoded.test_images,
            "test_labels": decoded.test_labels,
        }
        return tensors, {"classes": decoded.classes, "content_digest": content_digest(decoded)}

    # The raw files' cheap identity (paths, sizes, mtimes) decides when to decode again; the digest of what
    # they decode to keys everything built from the data. "layout" 2: the entry records that digest.
    fields = {"source": source.fingerprint(config, cache_dir), "layout": 2}
    cache = TensorCache(cache_dir)
    created = [path for path in (cache_dir, cache_dir / "decoded") if not path.exists()]
    try:
        artifact = cache.get_or_build("decoded", fields, build)
    except DataError:
        # Bad data fails the same way on every attempt: an empty entry left behind would only look like
        # a half-built cache. Other failures (a full disk, Ctrl-C) keep it, as the cache expects.
        _remove_entry(cache.directory("decoded", fields), created)
        raise
    tensors = artifact.tensors
    decoded = Decoded(
        tensors["train_images"],
        tensors["train_labels"],
        tensors["test_images"],
        tensors["test_labels"],
        artifact.meta["classes"],
    )
    return decoded, artifact.meta["content_digest"]


def _remove_entry(directory: Path, created: list[Path]) -> None:
    """Remove a cache entry that holds no artefact, its lock file, and the folders above it made for it."""
    if (directory / META).exists():  # another process finished it meanwhile: keep it
        return
    shutil.rmtree(directory, ignore_errors=True)
    Path(str(directory) + ".lock").unlink(missing_ok=True)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty: something else is cached there now
            pass


def content_digest(decoded: Decoded) -> str:
    """sha256 of the pixels, labels and class names. Why not the files' paths and mtimes: a copy of the same
    data (a fresh checkout, a container image, a re-synced share) must find the IG maps and teacher
    logits already computed for it, which cost tens of minutes on a CPU; about 0.2 s for CIFAR-10."""
    digest = hashlib.sha256()
    for tensor in (decoded.train_images, decoded.train_labels, decoded.test_images, decoded.test_labels):
        digest.update(tensor.contiguous().numpy())
    digest.update("\n".join(decoded.classes).encode())
    return digest.hexdigest()[:24]


def stratified_holdout(labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held out) with ``count`` held out in class proportion, both sorted."""
    if count > len(labels):
        raise DataError(f"cannot hold out {count} images from a set of {len(labels)}")
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * count / len(labels)
    quotas = exact.floor().long()
    # Largest remainders get the leftover images so the quotas sum to exactly `count`.
    leftover = count - int(quotas.sum())
    quotas[torch.argsort(exact - quotas, descending=True)[:leftover]] += 1
    held_out = []
    for label, quota in zip(classes.tolist(), quotas.tolist(), strict=True):
        members = torch.nonzero(labels == label).flatten()
        held_out.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    held = torch.cat(held_out).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def load_splits(config: DataConfig, cache_dir: str | Path | None = None) -> Splits:
    decoded, data_digest = load_decoded(config, cache_dir)
    train_pool, val_index = stratified_holdout(decoded.train_labels, config.val_size, config.split_seed)
    if config.train_subset is not None:
        if config.train_subset > len(train_pool):
            raise DataError(f"train_subset {config.train_subset} exceeds the {len(train_pool)} training images left")
        dropped = len(train_pool) - config.train_subset
        kept_positions, _ = stratified_holdout(decoded.train_labels[train_pool], dropped, config.split_seed + 1)
        train_pool = train_pool[kept_positions]
    keyed = {"data": data_digest, "val_size": config.val_size, "train_subset": config.train_subset}
    keyed["seed"] = config.split_seed
    size = config.image_size
    resize = size is not None and size != decoded.train_images.shape[-1] and config.dataset != Dataset.SYNTHETIC
    if resize:  # keyed only when resized, so the caches of data at its own size keep their keys
        keyed["image_size"] = size
    label = config.label or DATASETS[config.dataset]().default_label(config)
    return Splits(
        label=label,
        classes=decoded.classes,
        train_images=resized(decoded.train_images[train_pool], size) if resize else decoded.train_images[train_pool],
        train_labels=decoded.train_labels[train_pool],
        train_index=train_pool,
        val_images=resized(decoded.train_images[val_index], size) if resize else decoded.train_images[val_index],
        val_labels=decoded.train_labels[val_index],
        test_images=resized(decoded.test_images, size) if resize else decoded.test_images,
        test_labels=decoded.test_labels,
        fingerprint=content_key(keyed),
    )


def resized(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 images (N, 3, H, W) resized to (N, 3, size, size): antialiased bilinear, in batches of
    ``chunk`` so that a float copy of the whole set is never held."""
    import torch.nn.functional as F

    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk].float()
        scaled = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = scaled.round().clamp(0, 255).to(torch.uint8)
    return out
