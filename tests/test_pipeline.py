"""tf.data pipeline: order is a function of (seed, epoch), augmentation is exact where it can be."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fer_keras import FER2013_MEAN
from fer_keras.augment import MEAN_GREY, NO_AUGMENT, AugmentConfig
from fer_keras.data import Split
from fer_keras.errors import ConfigError
from fer_keras.pipeline import affine_transforms, augment_batch, eval_dataset, padded_size, train_dataset


def make_split(n=40):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 48, 48, 1)).astype("uint8")
    images[:, 0, 0, 0] = np.arange(n)  # pixel (0, 0) identifies the image when not augmented
    return Split(images, np.arange(n) % 7, np.asarray([str(i) for i in range(n)]))


def ids_per_epoch(ds, steps):
    batches = [x.numpy()[:, 0, 0, 0] for x, _ in ds]
    return [np.concatenate(batches[e * steps:(e + 1) * steps]) for e in range(len(batches) // steps)]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    split = make_split()
    epochs = ids_per_epoch(train_dataset(split, 8, seed=3, epochs=3, augment=NO_AUGMENT), 5)
    assert len(epochs) == 3
    for ids in epochs:
        assert sorted(ids) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])


def test_resumed_stream_equals_the_uninterrupted_one():
    split = make_split()
    aug = AugmentConfig(erasing=0.5)
    full = [x.numpy() for x, _ in train_dataset(split, 8, seed=5, epochs=3, augment=aug)]
    resumed = [x.numpy() for x, _ in train_dataset(split, 8, seed=5, epochs=3, initial_epoch=2, augment=aug)]
    assert len(resumed) == 5
    for a, b in zip(full[10:], resumed):
        np.testing.assert_array_equal(a, b)
    other = [x.numpy() for x, _ in train_dataset(split, 8, seed=6, epochs=1, augment=aug)]
    assert not np.array_equal(full[0], other[0])


def test_labels_follow_their_images():
    split = make_split()
    for x, y in train_dataset(split, 8, seed=1, epochs=1, augment=NO_AUGMENT):
        ids = x.numpy()[:, 0, 0, 0]
        np.testing.assert_array_equal(np.argmax(y.numpy(), 1), ids % 7)
        assert y.dtype == tf.float32 and x.dtype == tf.uint8


def test_flip_only_mirrors_exactly():
    images = tf.constant(make_split(16).images)
    out = augment_batch(images, AugmentConfig(flip=True, shift=0, rotation=0, zoom=0), tf.constant([1, 2], tf.int64))
    out = out.numpy()
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images.numpy())]
    same = [np.array_equal(o, i) for o, i in zip(out, images.numpy())]
    assert all(f or s for f, s in zip(flipped, same))
    assert 0 < sum(flipped) < 16


def test_shift_moves_content():
    x = np.zeros((1, 48, 48, 1), np.uint8)
    x[0, 20:28, 20:28] = 255
    out = augment_batch(tf.constant(np.repeat(x, 8, 0)), AugmentConfig(flip=False, shift=0.2, rotation=0, zoom=0),
                        tf.constant([4, 4], tf.int64)).numpy()
    centres = [np.argwhere(o[..., 0] > 128).mean(0) for o in out]
    moved = [np.abs(c - 23.5).max() for c in centres]
    assert max(moved) > 2 and max(moved) <= 0.2 * 48 + 1


@pytest.mark.parametrize("fill_mode", ["reflect", "constant", "nearest"])
def test_fill_mode_decides_what_a_shift_brings_in(fill_mode):
    """A bright image shifted by up to 20 %: constant fills the uncovered strip black (torchvision's fill=0),
    reflect and nearest fill it from the image, so nothing goes dark."""
    x = tf.constant(np.full((8, 48, 48, 1), 200, np.uint8))
    config = AugmentConfig(flip=False, shift=0.2, rotation=0, zoom=0, fill_mode=fill_mode)
    out = augment_batch(x, config, tf.constant([4, 4], tf.int64)).numpy()
    if fill_mode == "constant":
        assert (out == 0).mean(axis=(1, 2, 3)).max() > 0.05  # a whole strip of black
    else:
        assert (out == 200).all()


def test_unknown_fill_mode_is_refused():
    with pytest.raises(ConfigError, match="fill_mode must be one of reflect, constant, nearest, got 'black'"):
        AugmentConfig(fill_mode="black")


def test_warp_rounds_rather_than_truncates():
    """Sub-pixel shifts interpolate between neighbours; the uint8 result is the nearest grey level, so the warped
    batch's mean brightness stays within round-off of the float warp's (truncation would lose 0.5 on average)."""
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (64, 48, 48, 1)).astype(np.uint8))
    config = AugmentConfig(flip=False, shift=0.1, rotation=10, zoom=0.1)
    out = augment_batch(x, config, tf.constant([3, 5], tf.int64))
    assert out.dtype == tf.uint8
    from fer_keras.pipeline import affine_transforms

    seeds = tf.random.experimental.stateless_split(tf.constant([3, 5], tf.int64), 2)
    exact = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(x, tf.float32), transforms=affine_transforms(64, 48, config, seeds[0]),
        output_shape=[48, 48], fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT").numpy()
    diff = out.numpy().astype(np.float64) - exact
    assert np.abs(diff).max() <= 0.5 + 1e-4
    assert abs(diff.mean()) < 0.01


def transforms(n: int = 512, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The linear parts ``[n, 2, 2]``, the translations ``[n, 2]`` of affine_transforms' output-to-input maps, and
    where each map sends the image centre."""
    config = AugmentConfig(**{"flip": False, "shift": 0.0, "rotation": 0.0, "zoom": 0.0, **kwargs})
    t = affine_transforms(n, 48, config, tf.constant([4, 2], tf.int64)).numpy().astype(np.float64)
    linear = t[:, [0, 1, 3, 4]].reshape(n, 2, 2)
    offset = t[:, [2, 5]]
    return linear, offset, linear @ np.array([23.5, 23.5]) + offset


def test_the_warp_turns_and_scales_about_the_centre_and_shifts_it():
    """Rotation, zoom and flip keep the centre where it is, and the shift moves it by up to shift x 48 pixels,
    drawn for x and y apart. The linear part is a rotation within +-rotation degrees, with a mirror when flipped,
    over the drawn scale: its columns are orthogonal and of length 1 / scale, not sheared."""
    linear, _, centre = transforms(rotation=10.0, zoom=0.1, flip=True)
    np.testing.assert_allclose(centre, 23.5, atol=1e-4)
    gram = np.einsum("nki,nkj->nij", linear, linear)  # M^T M = I / scale^2 for a scaled rotation or mirror
    np.testing.assert_allclose(gram[:, 0, 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(gram[:, 0, 0], gram[:, 1, 1], rtol=1e-5)
    assert np.all((1 / 1.1**2 - 1e-5 <= gram[:, 0, 0]) & (gram[:, 0, 0] <= 1 / 0.9**2 + 1e-5))
    mirrored = np.linalg.det(linear) < 0
    assert 0.4 < mirrored.mean() < 0.6
    angles = np.degrees(np.arctan2(linear[:, 1, 0] * np.where(mirrored, -1, 1), linear[:, 1, 1]))
    assert np.abs(angles).max() <= 10.0 + 1e-4 and np.abs(angles).max() > 9.0
    _, _, centre = transforms(shift=0.1)
    moved = centre - 23.5
    assert np.abs(moved).max() <= 4.8 + 1e-4 and np.abs(moved).max(axis=0).min() > 4.5
    assert abs(np.corrcoef(moved[:, 0], moved[:, 1])[0, 1]) < 0.15  # x and y drawn apart


def test_erasing_applies_to_each_image_with_its_probability():
    x = np.full((400, 48, 48, 1), 7, np.uint8)
    out = augment_batch(tf.constant(x), AugmentConfig(flip=False, shift=0, rotation=0, zoom=0, erasing=0.5),
                        tf.constant([1, 3], tf.int64)).numpy()
    erased = (out != 7).any(axis=(1, 2, 3)).mean()
    assert 0.42 < erased < 0.58  # 400 draws: 4 standard deviations around 0.5


def test_the_same_images_are_augmented_anew_every_epoch():
    """The augmentation of epoch e is a function of (seed, e): identical images, so the shuffle cannot tell
    epochs apart, still come out differently in each epoch."""
    image = make_split(1).images[0]
    split = Split(np.repeat(image[None], 16, axis=0), np.zeros(16, np.int64), np.asarray([str(i) for i in range(16)]))
    batches = [x.numpy() for x, _ in train_dataset(split, 16, seed=2, epochs=2, augment=AugmentConfig(erasing=0.5))]
    assert len(batches) == 2 and not np.array_equal(batches[0], batches[1])


def test_erasing_changes_a_rectangle_only():
    x = np.full((8, 48, 48, 1), 7, np.uint8)
    out = augment_batch(tf.constant(x), AugmentConfig(flip=False, shift=0, rotation=0, zoom=0, erasing=1.0),
                        tf.constant([0, 9], tf.int64)).numpy()
    for o in out:
        changed = np.argwhere(o[..., 0] != 7)
        assert len(changed) > 0
        (r0, c0), (r1, c1) = changed.min(0), changed.max(0)
        assert len(changed) <= (r1 - r0 + 1) * (c1 - c0 + 1) <= 0.3 * 48 * 48


def erased_pixels(fill, max_area, n=64):
    x = np.full((n, 48, 48, 1), 7, np.uint8)
    config = AugmentConfig(flip=False, shift=0, rotation=0, zoom=0, erasing=1.0, erasing_fill=fill,
                           erasing_max_area=max_area)
    return augment_batch(tf.constant(x), config, tf.constant([0, 9], tf.int64)).numpy()


def test_erasing_noise_covers_every_grey_level():
    out = erased_pixels("noise", 0.25)
    levels = np.unique(out[out != 7])
    assert levels.min() == 0 and levels.max() == 255 and len(levels) == 255  # 0-255 but the background's 7


def test_erasing_fill_mean_writes_the_data_sets_mean_grey():
    out = erased_pixels("mean", 0.25)
    assert set(np.unique(out)) == {7, MEAN_GREY}
    assert (out == MEAN_GREY).any(axis=(1, 2, 3)).all()  # erasing=1: every image has its rectangle
    assert MEAN_GREY == round(255 * FER2013_MEAN)  # torchvision's value=0 after Normalize(mean, std)
    assert len(np.unique(erased_pixels("noise", 0.25))) > 200


def test_erasing_max_area_bounds_the_rectangle():
    side = 48 * 48
    small = (erased_pixels("mean", 0.05) == MEAN_GREY).sum(axis=(1, 2, 3))
    large = (erased_pixels("mean", 0.6) == MEAN_GREY).sum(axis=(1, 2, 3))
    assert small.min() > 0 and small.max() <= 0.05 * side * 1.3  # pixel-grid rounding of the rectangle's edges
    assert large.max() > 0.4 * side and large.mean() > 2 * small.mean()


def test_crop_moves_a_random_window_into_the_centre_by_whole_pixels():
    """input_crop=40: the model sees out[4:44, 4:44], which must be a 40-pixel window of the image at an offset
    drawn from every whole pixel in [-4, 4], as torchvision's RandomCrop(40) draws its windows."""
    x = make_split(64).images
    out = augment_batch(tf.constant(x), AugmentConfig(flip=False, shift=0, rotation=0, zoom=0, crop=40),
                        tf.constant([0, 4], tf.int64)).numpy()
    offsets = []
    for image, moved in zip(x, out):
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if np.array_equal(moved[4:44, 4:44], image[4 + dy:44 + dy, 4 + dx:44 + dx])]
        assert len(found) == 1
        offsets.append(found[0])
    dys, dxs = zip(*offsets)
    assert set(dys) == set(dxs) == set(range(-4, 5))
    plain = augment_batch(tf.constant(x), AugmentConfig(crop=0), tf.constant([0, 4], tf.int64))
    with_crop = augment_batch(tf.constant(x), AugmentConfig(crop=40), tf.constant([0, 4], tf.int64))
    assert not np.array_equal(plain, with_crop)


def test_erasing_stays_inside_the_crop_the_model_sees():
    x = np.full((64, 48, 48, 1), 7, np.uint8)
    config = AugmentConfig(flip=False, shift=0, rotation=0, zoom=0, crop=32, erasing=1.0, erasing_fill="mean",
                           erasing_max_area=0.5)
    erased = augment_batch(tf.constant(x), config, tf.constant([1, 2], tf.int64)).numpy() == MEAN_GREY
    inside = np.zeros((48, 48, 1), bool)
    inside[8:40, 8:40] = True
    assert erased.any(axis=(1, 2, 3)).all() and not (erased & ~inside).any()
    largest = erased.sum(axis=(1, 2, 3)).max()
    assert 0.35 * 32 * 32 < largest <= 0.5 * 32 * 32 * 1.3  # up to half the window (pixel-grid rounding aside)


def test_no_augment_is_identity_and_dtype_stays_uint8():
    x = tf.constant(make_split(4).images)
    np.testing.assert_array_equal(augment_batch(x, NO_AUGMENT, tf.constant([0, 0], tf.int64)), x)
    assert augment_batch(x, AugmentConfig(erasing=0.5), tf.constant([0, 0], tf.int64)).dtype == tf.uint8


def test_eval_dataset_keeps_order_and_partial_batch():
    split = make_split(10)
    xs = [x.numpy() for x, _ in eval_dataset(split, 4)]
    assert [len(x) for x in xs] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(xs), split.images)


def test_a_padded_eval_dataset_fills_the_last_batch_with_weight_zero_images():
    split = make_split(9)
    batches = list(eval_dataset(split, 4, pad_to_batch=True))
    assert [len(x) for x, _, _ in batches] == [4, 4, 4]
    x, y, w = (np.concatenate([b[i].numpy() for b in batches]) for i in range(3))
    np.testing.assert_array_equal(x[:9], split.images)
    np.testing.assert_array_equal(y[:9].argmax(1), split.labels)
    assert w.tolist() == [1.0] * 9 + [0.0] * 3
    assert not x[9:].any() and not y[9:].any()
    assert padded_size(9, 4) == 12 and padded_size(8, 4) == 8
    assert [len(b[0]) for b in eval_dataset(make_split(8), 4, pad_to_batch=True)] == [4, 4]
    with pytest.raises(ValueError, match="needs labels"):
        eval_dataset(split, 4, with_labels=False, pad_to_batch=True)


def test_mixup_mixes_each_image_and_label_with_its_mirror_in_the_batch():
    split = make_split(32)
    split.images[:] = np.arange(32, dtype="uint8")[:, None, None, None] * 8  # image i is uniform grey 8i
    mix = AugmentConfig(flip=False, shift=0, rotation=0, zoom=0, erasing=0, mixup=0.4)
    batches = list(train_dataset(split, 8, seed=2, epochs=1, augment=mix))
    plain = [x.numpy()[:, 0, 0, 0] // 8 for x, _ in train_dataset(split, 8, seed=2, epochs=1, augment=NO_AUGMENT)]
    lams = []
    for (x, y), ids in zip(batches, plain):
        x, y = x.numpy().astype(float), y.numpy()
        partner = ids[::-1]
        grey_a, grey_b = 8.0 * ids, 8.0 * partner
        # Recover each weight from the blended grey level, then check y = lam * own + (1 - lam) * partner's.
        differ = grey_a != grey_b
        lam = np.where(differ, (x[:, 0, 0, 0] - grey_b) / np.where(differ, grey_a - grey_b, 1), 1.0)
        expected_y = lam[:, None] * np.eye(7)[ids % 7] + (1 - lam[:, None]) * np.eye(7)[partner % 7]
        np.testing.assert_allclose(y, expected_y, atol=0.5 / 8 + 1e-6)  # lam from rounded pixels
        np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-6)
        assert (x == x[:, :1, :1, :]).all()  # still uniform: a pixel-wise blend of two uniform images
        lams.extend(lam[differ])
    lams = np.asarray(lams)
    assert ((lams >= 0) & (lams <= 1)).all() and lams.std() > 0.1  # Beta(0.4, 0.4) weights vary widely
    again = list(train_dataset(split, 8, seed=2, epochs=1, augment=mix))
    for (a, ya), (b, yb) in zip(batches, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())


@pytest.mark.parametrize("kwargs", [{"shift": 0.9}, {"rotation": -1}, {"zoom": 1.0}, {"erasing": 2}, {"mixup": -0.1},
                                    {"erasing_max_area": 0.02}, {"erasing_max_area": 1.5}, {"erasing_fill": "grey"},
                                    {"crop": -1}])
def test_bad_augment_values_are_refused(kwargs):
    with pytest.raises(ConfigError):
        AugmentConfig(**kwargs)


def test_fewer_images_than_a_batch_is_a_clear_error():
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train_dataset(make_split(4), 8, seed=0, epochs=1)


def test_unlabelled_images_are_refused_for_training_and_evaluation():
    split = make_split(16)
    split.labels[3] = -1  # would be an all-zero one-hot in training, class 6 in evaluation
    with pytest.raises(ConfigError, match=r"1 of 16 images have no label \(the first: id 3\); training needs "
                                          r"labelled images"):
        train_dataset(split, 8, seed=0, epochs=1)
    with pytest.raises(ConfigError, match="evaluation needs labelled images"):
        eval_dataset(split, 8)
    assert len(list(eval_dataset(split, 8, with_labels=False))) == 2


def test_a_seed_beyond_31_bits_is_refused_not_aliased():
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2147483647\], got 2147483648"):
        train_dataset(make_split(), 8, seed=2**31, epochs=1)
