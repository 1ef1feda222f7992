import math

import torch
import torch.nn.functional as F

from kdsearch.distill.augment import OVERLAY_MODES, ig_overlay, random_crop_flip


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_overlay_with_p_zero_is_identity():
    images, maps = torch.rand(16, 3, 8, 8), torch.rand(16, 8, 8)
    out, blended = ig_overlay(images, maps, 0.0, _generator())
    assert torch.equal(out, images) and not blended.any()


def test_overlay_with_p_one_always_blends_and_stays_in_unit_range():
    images, maps = torch.rand(64, 3, 8, 8), torch.rand(64, 8, 8) * 1e-3  # IG maps are small numbers
    out, blended = ig_overlay(images, maps, 1.0, _generator())
    assert blended.all()
    assert not torch.isclose(out, images).all(dim=(1, 2, 3)).any()
    assert out.min() >= 0 and out.max() <= 1


def test_overlay_blends_half_image_half_min_max_map():
    images = torch.zeros(1, 3, 2, 2)
    maps = torch.tensor([[[0.0, 2.0], [4.0, 4.0]]])
    out, _ = ig_overlay(images, maps, 1.0, _generator())
    assert out[0, :, 0, 0].eq(0).all() and out[0, :, 1, 1].eq(0.5).all()  # min → 0, max → 1, halved


def test_overlay_exponent_is_log_uniform_in_one_to_two():
    size = 4000
    images = torch.zeros(size, 3, 1, 3)
    maps = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3).expand(size, 1, 3)
    out, _ = ig_overlay(images, maps, 1.0, _generator())
    exponents = torch.log(2 * out[:, 0, 0, 1]) / math.log(0.5)  # 0.5 * 0.5**s recovers s
    assert exponents.min() >= 1 - 1e-5 and exponents.max() <= 2 + 1e-5
    log_s = torch.log(exponents)  # log-uniform: ln s is uniform on [0, ln 2]
    assert abs(log_s.mean().item() - math.log(2) / 2) < 0.02
    assert exponents.min() < 1.01 and exponents.max() > 1.99


def test_overlay_probability_is_respected():
    _, blended = ig_overlay(torch.rand(5000, 3, 2, 2), torch.rand(5000, 2, 2), 0.25, _generator())
    assert abs(blended.float().mean().item() - 0.25) < 0.03


def test_crop_and_flip_move_image_and_map_together():
    images = torch.rand(32, 3, 12, 12)
    maps = images[:, :1] * 7  # a map that is a known function of the image
    out = random_crop_flip(torch.cat([images, maps], 1), 4, _generator())
    torch.testing.assert_close(out[:, 3:], out[:, :1] * 7)


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    images = torch.rand(64, 1, 6, 6)
    out = random_crop_flip(images, 2, _generator(3))
    padded = F.pad(images, (2, 2, 2, 2))
    for sample in range(64):
        windows = [
            candidate
            for dy in range(5)
            for dx in range(5)
            for candidate in (padded[sample, :, dy : dy + 6, dx : dx + 6],)
        ]
        windows += [window.flip(-1) for window in windows]
        assert any(torch.equal(out[sample], window) for window in windows)
    assert not torch.equal(out, images)  # something moved


def test_shuffled_mode_never_picks_the_images_own_map():
    index = torch.arange(500)
    other = OVERLAY_MODES["shuffled"](index, 500, _generator())
    assert (other != index).all() and other.max() < 500 and other.min() >= 0
    assert torch.equal(OVERLAY_MODES["aligned"](index, 500, _generator()), index)
