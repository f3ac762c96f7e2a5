"""Non-leaking augmentation (common.augment): what the parameter vector says is what was done to the image,
zero parameters are the identity, and the draws are deterministic (docs/method.md, "Non-leaking augmentation")."""
import pytest
import torch

import common

DIM = common.AUGMENT_DIM


def images(n=6, size=16, channels=1, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def only(n, **values):
    """Parameters (n, AUGMENT_DIM) with the given columns set (flip=0, turn=(1, 2), shift=(3, 4), scale=5)."""
    params = torch.zeros(n, DIM)
    for name, value in values.items():
        columns = {"flip": [0], "turn": [1, 2], "shift": [3, 4], "scale": [5]}[name]
        params[:, columns] = torch.as_tensor(value, dtype=torch.float32)
    return params


def test_probability_zero_returns_the_images_unchanged_with_zero_parameters():
    x = images()
    y, params = common.augment(x, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(y, x) and params.shape == (6, DIM) and not params.any()
    assert torch.equal(common.apply_augmentation(x, torch.zeros(6, DIM)), x)


def test_probability_one_transforms_every_image_and_the_parameters_say_how():
    x = images(64)
    y, params = common.augment(x, 1.0, torch.Generator().manual_seed(2))
    assert (params[:, 0] == 1).all(), "every image is flipped"
    assert (params[:, 1:3] != 0).any(1).all(), "every image is turned by 1-3 quarter turns"
    assert (params[:, 5] != 0).all(), "every image is scaled"
    assert (params[:, 3:5] != 0).any(1).float().mean() > 0.5, "most images are shifted (a zero shift may be drawn)"
    assert all((y[i] != x[i]).any() for i in range(len(x)))
    assert torch.equal(common.apply_augmentation(x, params), y), "the parameters alone reproduce the images"
    m = common.max_shift(16)
    assert ((params[:, 3:5] * m).round() == params[:, 3:5] * m).all() and params[:, 3:5].abs().max() <= 1


def test_about_a_fraction_p_of_images_gets_each_transform():
    _, params = common.augment(images(4000, size=8), 0.12, torch.Generator().manual_seed(3))
    for columns in ([0], [1, 2], [5]):
        assert params[:, columns].ne(0).any(1).float().mean().item() == pytest.approx(0.12, abs=0.02)
    assert params.ne(0).any(1).float().mean().item() == pytest.approx(1 - 0.88 ** 4, abs=0.03)


def test_flip_parameter_one_flips_left_right_and_flipping_again_recovers_the_image():
    x = images()
    flipped = common.apply_augmentation(x, only(6, flip=1))
    assert torch.equal(flipped, x.flip(3)) and not torch.equal(flipped, x)
    assert torch.equal(common.apply_augmentation(flipped, only(6, flip=1)), x)


def test_four_quarter_turns_recover_the_image_and_one_is_rot90():
    x = images()
    turn = only(6, turn=[-1, 1])  # k = 1: (cos - 1, sin) = (-1, 1)
    y = common.apply_augmentation(x, turn)
    assert torch.equal(y, x.rot90(1, (2, 3))) and not torch.equal(y, x)
    for _ in range(3):
        y = common.apply_augmentation(y, turn)
    assert torch.equal(y, x)
    assert torch.equal(common.apply_augmentation(x, only(6, turn=[-2, 0])), x.rot90(2, (2, 3)))


def test_integer_translation_moves_a_lit_pixel_by_the_encoded_amount():
    _, params = common.augment(torch.zeros(200, 1, 16, 16), 1.0, torch.Generator().manual_seed(4))
    shift = params[:, 3:5] * common.max_shift(16)  # (tx, ty) in pixels
    assert shift.abs().max() == common.max_shift(16) == 2 and len(shift.unique(dim=0)) == 25
    x = torch.zeros(200, 1, 16, 16)
    x[:, :, 8, 7] = 1  # row 8, column 7
    y = common.apply_augmentation(x, only(200, shift=0) + torch.nn.functional.pad(params[:, 3:5], (3, 1)))
    lit = y[:, 0].flatten(1).argmax(1)
    assert torch.equal(y.sum((1, 2, 3)), torch.ones(200)) and y.max() == 1
    assert torch.equal(lit // 16, 8 + shift[:, 1].long()) and torch.equal(lit % 16, 7 + shift[:, 0].long())


def test_translation_mirrors_the_pixels_next_to_the_edge_into_the_image():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, :, 1] = 1  # column 1
    m = common.max_shift(8)  # one pixel
    y = common.apply_augmentation(x, only(1, shift=[1, 0]))
    assert torch.equal(y[0, 0, 0].nonzero().flatten(), torch.tensor([0, 2])), "column 1 moves right; -1 mirrors 1"
    y = common.apply_augmentation(x, only(1, shift=[-1 / m, 0]))
    assert torch.equal(y[0, 0, 0].nonzero().flatten(), torch.tensor([0]))


def test_scaling_magnifies_about_the_centre_and_keeps_a_constant_image():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 6:10, 6:10] = 1  # a 4x4 block around the centre (7.5, 7.5)
    double = only(1, scale=1 / common.AUGMENT_SCALE_STD)  # s = 2^(0.2 z) = 2
    y = common.apply_augmentation(x, double)[0, 0]
    assert y.sum().item() == pytest.approx(4 * x.sum().item(), rel=0.05), "area grows by s^2"
    grid = torch.arange(16.0)
    centre = ((y.sum(1) * grid).sum() / y.sum(), (y.sum(0) * grid).sum() / y.sum())
    assert centre[0].item() == pytest.approx(7.5, abs=1e-4) and centre[1].item() == pytest.approx(7.5, abs=1e-4)
    constant = torch.full((1, 1, 16, 16), 0.3)
    torch.testing.assert_close(common.apply_augmentation(constant, only(1, scale=-2.0)), constant)


def test_a_batch_is_augmented_like_each_image_alone():
    x = images(32)
    y, params = common.augment(x, 0.7, torch.Generator().manual_seed(5))
    alone = torch.cat([common.apply_augmentation(x[i:i + 1], params[i:i + 1]) for i in range(32)])
    torch.testing.assert_close(alone, y, rtol=0, atol=1e-5)


def test_same_seed_gives_the_same_augmentation_and_the_draws_do_not_depend_on_p():
    x = images(16, channels=3)
    first = common.augment(x, 0.5, torch.Generator().manual_seed(6))
    again = common.augment(x, 0.5, torch.Generator().manual_seed(6))
    other = common.augment(x, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    states = []
    for p in (0.0, 0.12, 1.0):
        g = torch.Generator().manual_seed(8)
        common.augment(x, p, g)
        states.append(g.get_state())
    assert all(torch.equal(s, states[0]) for s in states), "a resumed run draws the same stream whatever p"


def test_augmentation_refuses_non_square_images_and_wrong_parameters():
    with pytest.raises(common.UserError, match="square"):
        common.augment(torch.zeros(2, 1, 8, 16), 0.5)
    with pytest.raises(common.UserError, match="parameters of shape"):
        common.apply_augmentation(torch.zeros(2, 1, 8, 8), torch.zeros(2, DIM + 1))
