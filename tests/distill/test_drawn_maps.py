"""``overlay.maps: drawn``: only the maps a run's overlay blends are computed, each once, as runs need them."""

from __future__ import annotations

import pytest
import torch

import kdsearch.distill.augment as augment
from kdsearch.config import OverlayConfig, replace
from kdsearch.distill.attribution import Attribution, attribution_maps
from kdsearch.distill.drawn_maps import drawn_maps
from kdsearch.distill.train import drawn_images, prepare_inputs, train
from kdsearch.errors import ConfigError


def _drawn(config, p: float = 0.2, **changes):
    return replace(config, overlay=OverlayConfig(p=p, maps="drawn"), **changes)


@pytest.mark.parametrize("mode", ["aligned", "shuffled"])
def test_the_replay_names_exactly_the_maps_training_blends(student_config, monkeypatch, mode):
    config = replace(student_config, overlay=OverlayConfig(p=0.2, mode=mode), epochs=2)
    blended: list[torch.Tensor] = []

    def recording(index, count, recipe, generator):
        map_index, mask, exponents = real(index, count, recipe, generator)
        blended.append(map_index[mask])
        return map_index, mask, exponents

    real = augment.batch_overlay_draws
    monkeypatch.setattr(augment, "batch_overlay_draws", recording)
    train(config, progress=False)
    count = len(prepare_inputs(replace(config, overlay=OverlayConfig(p=0.0))).splits.train_labels)
    expected = drawn_images(config, count)
    assert torch.equal(torch.unique(torch.cat(blended)), expected)
    assert 0 < len(expected) < count  # 2 epochs at p 0.2 leave about 64 % of the images undrawn


def test_a_run_computes_only_its_drawn_maps_and_they_are_the_full_caches(student_config):
    config = _drawn(student_config)
    inputs = prepare_inputs(config, progress=False)
    count = len(inputs.splits.train_labels)
    needed = drawn_images(config, count)
    coverage = inputs.map_coverage["integrated_gradients"]
    assert torch.equal(coverage.nonzero().flatten(), needed)
    maps = inputs.maps["integrated_gradients"]
    assert maps[~coverage].abs().sum() == 0 and (maps[coverage].flatten(1).amax(1) > 0).all()

    full = attribution_maps(
        inputs.teacher, inputs.splits, Attribution.of(config), config.cache_dir, torch.device("cpu"), progress=False
    ).tensors["maps"]
    torch.testing.assert_close(maps[coverage].float(), full[needed].float(), rtol=2e-3, atol=1e-4)
    # Once the full cache exists, it serves every run.
    again = prepare_inputs(config, progress=False)
    assert "integrated_gradients" not in again.map_coverage
    assert again.map_keys["integrated_gradients"] == inputs.map_keys["integrated_gradients"]  # same key fields
    assert torch.equal(again.maps["integrated_gradients"], full)


def test_another_run_adds_only_the_maps_it_lacks_and_never_recomputes_one(student_config, tmp_path):
    first, second = _drawn(student_config), _drawn(student_config, seed=1)
    inputs = prepare_inputs(first, progress=False)
    store = next((tmp_path / "cache").glob("ig-drawn/*/"))
    assert len(list(store.glob("part-*.pt"))) == 1
    before = inputs.maps["integrated_gradients"].clone()

    train(second, inputs=inputs, progress=False)  # prepared for seed 0: seed 1 draws other images

    count = len(inputs.splits.train_labels)
    wanted = torch.unique(torch.cat([drawn_images(first, count), drawn_images(second, count)]))
    coverage = inputs.map_coverage["integrated_gradients"]
    assert torch.equal(coverage.nonzero().flatten(), wanted)
    had = before.flatten(1).amax(1) > 0
    assert torch.equal(inputs.maps["integrated_gradients"][had], before[had])  # the maps it had stay as they were
    parts = [torch.load(part, weights_only=True)["index"] for part in store.glob("part-*.pt")]
    assert len(parts) == 2 and not set(parts[0].tolist()) & set(parts[1].tolist())  # each map computed once
    # A third process asking for the same images computes nothing.
    found = drawn_maps(
        inputs.teacher, inputs.splits, Attribution.of(second), wanted, second.cache_dir, torch.device("cpu")
    )
    assert found.ms_per_map is None and len(list(store.glob("part-*.pt"))) == 2
    assert torch.equal(found.have.nonzero().flatten(), wanted)


def test_overlay_maps_must_be_all_or_drawn():
    with pytest.raises(ConfigError, match="overlay maps"):
        OverlayConfig(maps="some")
