import torch

from cifar_core.augment import (AugmentConfig, alternate_flip, augment_batch, cutout, random_translate,
                                resize)


def batch(n=64, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_augment_keeps_shape_dtype_and_range():
    x = batch()
    for cfg in (AugmentConfig(), AugmentConfig(cutout=8, flip_mode="random"), AugmentConfig(translate=4)):
        y = augment_batch(x, cfg, torch.Generator().manual_seed(1), indices=torch.arange(64))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1
        assert not torch.equal(x, y)


def test_translate_is_a_shift_of_the_padded_image():
    x = batch(200)
    y = random_translate(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        match = [(oy, ox) for oy in range(5) for ox in range(5)
                 if torch.equal(padded[i, :, oy:oy + 32, ox:ox + 32], y[i])]
        assert match, "each output must be a crop of its own padded image"
        shifts.add(match[0])
    assert len(shifts) == 25  # every offset occurs


def test_alternate_flip_flips_each_image_every_other_epoch():
    x = batch(100)
    idx = torch.arange(1000, 1100)
    e0, e1 = alternate_flip(x, idx, 0, seed=0), alternate_flip(x, idx, 1, seed=0)
    flipped0 = torch.tensor([torch.equal(e0[i], x[i].flip(-1)) for i in range(100)])
    flipped1 = torch.tensor([torch.equal(e1[i], x[i].flip(-1)) for i in range(100)])
    assert bool((flipped0 ^ flipped1).all())  # exactly one of two consecutive epochs flips
    assert 30 < int(flipped0.sum()) < 70      # about half each epoch


def test_cutout_zeroes_a_square():
    x = torch.ones(32, 3, 32, 32)
    y = cutout(x, 8, torch.Generator().manual_seed(0))
    zeros = (y == 0).all(1).flatten(1).sum(1)
    assert bool((zeros > 0).all()) and bool((zeros <= 81).all())


def test_resize():
    x = batch(4)
    assert resize(x, 64).shape == (4, 3, 64, 64)
    assert resize(x, 32) is x
    assert resize(torch.rand(2, 3, 64, 64), 32).shape == (2, 3, 32, 32)


def test_mixup_and_cutmix_blend_images_and_weigh_labels_by_what_was_kept():
    from cifar_core.augment import mix_batch
    x = torch.stack([torch.full((3, 32, 32), float(i)) for i in range(8)])
    y = torch.arange(8)
    same = mix_batch(x, y, AugmentConfig(mix="none"), torch.Generator().manual_seed(0))
    assert same[0] is x and same[3] == 1.0
    mixed, y_a, y_b, lam = mix_batch(x, y, AugmentConfig(mix="mixup"), torch.Generator().manual_seed(0))
    assert torch.equal(y_a, y) and 0 <= lam <= 1
    assert torch.allclose(mixed[:, 0, 0, 0], lam * y.float() + (1 - lam) * y_b.float())
    cut, _, y_b, lam = mix_batch(x, y, AugmentConfig(mix="cutmix"), torch.Generator().manual_seed(1))
    own = (cut == x).flatten(1).float().mean(1)  # share of each image's own pixels
    moved = y_b != y
    assert torch.allclose(own[moved], torch.full_like(own[moved], lam), atol=1e-6)
    again = mix_batch(x, y, AugmentConfig(mix="cutmix"), torch.Generator().manual_seed(1))
    assert torch.equal(again[0], cut)  # the generator makes it reproducible


def test_view_plan_is_a_fixed_flip_and_shift_per_image_whatever_the_batch():
    from cifar_core.augment import apply_view, view_plan
    cfg = AugmentConfig(views=4)
    x = batch(300)
    rows = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:300]  # data set rows of x
    plan = view_plan(1000, 1, cfg)
    assert torch.equal(plan.dy, view_plan(1000, 1, cfg).dy)  # no hidden randomness: a teacher can replay it
    assert not torch.equal(plan.dy, view_plan(1000, 2, cfg).dy)
    whole = apply_view(x, plan, rows, cfg)
    # the same rows in another batch order (a student's shuffle) get the same views
    order = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(apply_view(x[order], plan, rows[order], cfg), whole[order])
    assert torch.equal(augment_batch(x, cfg, indices=rows, plan=plan), whole)  # no cutout: the plan alone
    for i in range(0, 300, 7):  # flip first, then crop the reflect-padded image at the planned offset
        r = rows[i]
        src = torch.nn.functional.pad(x[i].flip(-1) if plan.flip[r] else x[i], (2, 2, 2, 2), mode="reflect")
        assert torch.equal(whole[i], src[:, plan.dy[r]:plan.dy[r] + 32, plan.dx[r]:plan.dx[r] + 32])
    # alternate flipping: every image flips in exactly one of two consecutive views, about half per view
    flips = torch.stack([view_plan(1000, v, cfg).flip for v in range(4)])
    assert bool((flips[0] ^ flips[1]).all() and (flips[1] ^ flips[2]).all())
    assert 400 < int(flips[0].sum()) < 600
    assert set(plan.dy.tolist()) == set(range(5)) and set(plan.dx.tolist()) == set(range(5))


def test_planned_mixup_fixes_partner_and_weight_per_image_within_the_pool():
    import numpy as np
    import pytest
    from cifar_core.augment import show_view, view_plan
    cfg = AugmentConfig(views=4, mix="mixup", mix_alpha=1.0)
    pool = torch.arange(100, 900)  # the training rows; 0-99 and 900-999 stand for val and test
    plan = view_plan(1000, 1, cfg, pool=pool)
    again = view_plan(1000, 1, cfg, pool=pool)
    assert torch.equal(plan.partner, again.partner) and torch.equal(plan.lam, again.lam)  # replayable
    assert not torch.equal(plan.partner, view_plan(1000, 2, cfg, pool=pool).partner)
    # partners are a permutation of the pool: no val or test image is ever blended into a training image
    assert torch.equal(plan.partner[pool].sort().values, pool)
    outside = torch.cat([torch.arange(100), torch.arange(900, 1000)])
    assert torch.equal(plan.partner[outside], outside) and bool((plan.lam[outside] == 1).all())
    lam = plan.lam[pool]
    assert bool(((lam >= 0) & (lam <= 1)).all()) and abs(float(lam.mean()) - 0.5) < 0.05  # Beta(1, 1): uniform
    # mixing draws from its own stream: the flips and shifts are those of the unmixed plan
    plain = view_plan(1000, 1, AugmentConfig(views=4))
    assert torch.equal(plan.flip, plain.flip) and torch.equal(plan.dy, plain.dy) and plain.partner is None
    with pytest.raises(ValueError, match="pool"):
        view_plan(1000, 1, cfg)
    with pytest.raises(ValueError, match="cutmix"):
        AugmentConfig(views=2, mix="cutmix")
    # show_view blends each image's own view with its partner's own view, rounded once to uint8
    images = (torch.rand(1000, 3, 32, 32) * 255).to(torch.uint8)
    rows = pool[torch.randperm(800, generator=torch.Generator().manual_seed(0))[:50]]
    shown = show_view(images, rows, plan, cfg)
    assert shown.dtype == torch.uint8
    from cifar_core.augment import apply_view
    own = apply_view(images[rows].float(), plan, rows, cfg)
    other = apply_view(images[plan.partner[rows]].float(), plan, plan.partner[rows], cfg)
    lam = plan.lam[rows].view(-1, 1, 1, 1)
    expected = (own * lam + other * (1 - lam)).round().clamp(0, 255)
    assert np.array_equal(shown.numpy(), expected.to(torch.uint8).numpy())
    # unmixed plans show exactly the flipped and shifted image
    assert torch.equal(show_view(images, rows, plain, cfg), apply_view(images[rows].float(), plain, rows, cfg)
                       .to(torch.uint8))
