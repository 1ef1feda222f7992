"""Attention transfer (Zagoruyko & Komodakis 2017): the student matches the teacher's spatial attention.

The attention map of a (B, C, H, W) activation is Q = mean_c |A_c|^p, flattened to (B, H*W) and
L2-normalised per sample; it says where in the image a block's activations are large, whatever their
channel count, so a student of any width can be paired with the teacher at equal spatial size. Pairs are
(student block, teacher block) indices into ``model.features``; ``FeatureTaps`` collects those blocks'
outputs during the ordinary forward passes, so neither model needs a second forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import trunk


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) activations -> (B, H*W) unit-L2 attention maps, in float32 even under autocast.

    Float32 first: bf16 keeps about 3 significant digits, coarser than the student-teacher differences
    the loss has to see, and fp16 squares of large activations overflow.
    """
    if features.ndim != 4:
        raise ValueError(f"attention_map needs (B, C, H, W) features but got shape {tuple(features.shape)}")
    if not p > 0:
        raise ValueError(f"attention_map needs p > 0 but got {p=}")
    energy = features.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(energy, dim=1)


def at_loss(
    student_features: torch.Tensor | Sequence[torch.Tensor],
    teacher_features: torch.Tensor | Sequence[torch.Tensor],
    p: float = 2.0,
) -> torch.Tensor:
    """Mean over pairs of the batch mean of ||Q_s - Q_t||_2, the per-sample L2 distance of attention maps.

    Features are paired by position (a single tensor is one pair); channel counts may differ, batch and
    spatial sizes may not. Teacher features are detached: only the student is trained.

    Why this norm and reduction: it is the paper's Eq. 2 as written (the 2-norm, not its square), and
    per sample it does not depend on the map size H*W and lies in [0, sqrt(2)] (two non-negative unit
    vectors), so a weight gamma means the same at every resolution and for any number of pairs (mean
    over pairs, not sum). Its gradient does not shrink as Q_s approaches Q_t (like an L1 loss); torch
    makes it 0 at exactly Q_s == Q_t.

    Other scales, with d = Q_s - Q_t of one sample and HW its map size; both take the mean of d^2 over
    batch and pixels, i.e. mean_b ||d||^2 / HW per pair:
    - the original AT code sums that over its pairs and weighs it by beta/2 (beta = 1e3 in the paper);
    - nordlinglab/ModelCompression-IntegratedGradients (PyTorch_CIFAR10/UTILS_TORCH.py, attention_loss)
      has one 8x8 pair (HW = 64) weighted by gamma = 0.8, no 1/2.
    The same per-pair gradient at distance ||d|| needs gamma here = w * 2 ||d|| / HW for their weight w
    (beta/2 or gamma), e.g. 0.8 * 2 * 0.2 / 64 = 0.005 for theirs at ||d|| = 0.2: gammas do not carry over.
    """
    students, teachers = _as_list(student_features), _as_list(teacher_features)
    if not students or len(students) != len(teachers):
        raise ValueError(
            f"at_loss needs one teacher feature map per student feature map and at least one pair "
            f"but got {len(students)} student and {len(teachers)} teacher maps"
        )
    distances = []
    for pair, (student, teacher) in enumerate(zip(students, teachers, strict=True)):
        same_shape = student.ndim == teacher.ndim == 4 and student.shape[0] == teacher.shape[0]
        if not same_shape or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"attention pair {pair}: student features {tuple(student.shape)} and teacher features "
                f"{tuple(teacher.shape)} need the same batch and spatial size (B, *, H, W)"
            )
        difference = attention_map(student, p) - attention_map(teacher.detach(), p)
        distances.append(torch.linalg.vector_norm(difference, dim=1).mean())
    return torch.stack(distances).mean()


def _as_list(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # A bare tensor is one pair; iterating it would silently split the batch into "pairs".
    return [features] if isinstance(features, torch.Tensor) else list(features)


def blocks_of(model: nn.Module) -> nn.Sequential:
    """The ordered trunk whose blocks attention pairs index; a one-line ConfigError for a model without one."""
    found = trunk(model)
    if found is None:
        name = type(model.net).__name__ if hasattr(model, "net") else type(model).__name__
        raise ConfigError(
            f"attention transfer pairs blocks of an ordered trunk (a Sequential `features`); {name} has none"
        )
    return found


class FeatureTaps:
    """Collect the outputs of ``model.features[i]`` for the given indices during forward passes.

    ``outputs`` holds the latest forward's outputs in the order of ``indices``. Each forward of
    ``model.features`` starts by dropping the previous ones, so a training loop holds at most one batch
    of them; ``clear()`` drops them earlier (after the loss, before the next forward). Every hook is
    removed when the ``with`` block ends, also on an exception.

        with FeatureTaps(student, [3, 6, 13]) as student_taps, FeatureTaps(teacher, [3, 6, 13]) as teacher_taps:
            logits = student(images)
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = loss + gamma * at_loss(student_taps.outputs, teacher_taps.outputs)
    """

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        self._features: nn.Sequential = blocks_of(model)
        self._indices = list(indices)
        self._outputs: list[torch.Tensor | None] = [None] * len(self._indices)
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> FeatureTaps:
        try:
            self._handles.append(self._features.register_forward_pre_hook(lambda module, args: self.clear()))
            for slot, index in enumerate(self._indices):
                self._handles.append(self._features[index].register_forward_hook(self._store(slot)))
        except BaseException:
            # __exit__ does not run when __enter__ raises (e.g. an index out of range).
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._remove_hooks()
        self.clear()

    @property
    def outputs(self) -> list[torch.Tensor]:
        missing = [index for index, output in zip(self._indices, self._outputs, strict=True) if output is None]
        if missing:
            raise RuntimeError(f"features[{missing[0]}] has produced no output since the taps were last cleared")
        return list(self._outputs)

    def clear(self) -> None:
        self._outputs = [None] * len(self._indices)

    def _store(self, slot: int):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            self._outputs[slot] = output

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def default_pairs(student: nn.Module, teacher: nn.Module, image_size: int = 32) -> list[tuple[int, int]]:
    """(student block, teacher block) at the end of each resolution stage the student keeps.

    For each spatial size of the student's blocks, its last block at that size is paired with the
    teacher's last block at the same size. Why stage ends: they are the most processed features at a
    resolution, just before it is halved, and they exist in both networks however many blocks the
    student dropped or how wide it is; the AT paper likewise pairs the ends of its ResNet groups. (The
    nordlinglab reference instead taps one block, features[len(features) // 2] = 9, mid 64-channel stage.)
    Student sizes the teacher does not have are skipped.
    """
    student_ends = _stage_ends(_block_sizes(student, image_size))
    teacher_ends = _stage_ends(_block_sizes(teacher, image_size))
    pairs = sorted((index, teacher_ends[size]) for size, index in student_ends.items() if size in teacher_ends)
    if not pairs:
        raise ConfigError(
            f"no student feature block has the spatial size of a teacher block at {image_size}x{image_size} "
            f"input (student {sorted(student_ends)}, teacher {sorted(teacher_ends)})"
        )
    return pairs


def check_pairs(student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[int, int]], image_size: int = 32) -> None:
    """Raise a one-line ConfigError unless every pair names existing blocks of equal spatial size."""
    if not pairs:
        raise ConfigError("attention pairs must name at least one (student block, teacher block) pair")
    for pair in pairs:
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ConfigError(f"attention pairs must be [student block, teacher block] but got {pair!r}")
        student_index, teacher_index = pair
        for role, model, index in (("student", student, student_index), ("teacher", teacher, teacher_index)):
            count = len(blocks_of(model))
            if not isinstance(index, int) or not 0 <= index < count:
                raise ConfigError(
                    f"attention pair ({student_index}, {teacher_index}): the {role} has feature blocks "
                    f"0-{count - 1}, not {index!r}"
                )
    student_sizes, teacher_sizes = _block_sizes(student, image_size), _block_sizes(teacher, image_size)
    for student_index, teacher_index in pairs:
        student_size, teacher_size = student_sizes[student_index], teacher_sizes[teacher_index]
        if student_size != teacher_size:
            raise ConfigError(
                f"attention pair ({student_index}, {teacher_index}): student block {student_index} outputs "
                f"{student_size[0]}x{student_size[1]} maps but teacher block {teacher_index} outputs "
                f"{teacher_size[0]}x{teacher_size[1]}; paired blocks need the same spatial size"
            )


def _block_sizes(model: nn.Module, image_size: int) -> list[tuple[int, int]]:
    """(H, W) of every ``model.features`` block's output, from one forward of a blank image."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    # Eval mode: a training-mode BatchNorm would fold this blank image into its running statistics.
    model.eval()
    try:
        with FeatureTaps(model, range(len(blocks_of(model)))) as taps, torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
            return [(output.shape[-2], output.shape[-1]) for output in taps.outputs]
    finally:
        model.train(was_training)


def _stage_ends(sizes: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
    # Later blocks overwrite earlier ones: each size maps to its last block.
    return {size: index for index, size in enumerate(sizes)}
