"""The training augmentation's settings, kept free of TensorFlow.

Flag definitions and ``TrainConfig.validate`` need the settings' choices and checks but none of the tf.data code
in :mod:`fer_keras.pipeline`, so neither imports TensorFlow.
"""

from __future__ import annotations

import dataclasses

from fer_keras import FER2013_MEAN, IMAGE_SIZE
from fer_keras.errors import ConfigError

# How the warp fills pixels it maps from outside the image: reflect (this project's recipes) or constant black,
# as torchvision's RandomAffine and RandomResizedCrop fill (fill=0); nearest repeats the edge.
FILL_MODES = ("reflect", "constant", "nearest")
# What random erasing writes into its rectangle: uniform noise (this project's recipes) or the data set's mean grey,
# which is what torchvision's RandomErasing(value=0) writes after Normalize(mean, std).
ERASING_FILLS = ("noise", "mean")
# The data set's mean grey level: torchvision's RandomErasing(value=0) after Normalize(mean, std).
MEAN_GREY = round(255 * FER2013_MEAN)


def check_input_crop(input_crop: int, image_size: int = IMAGE_SIZE) -> None:
    """A ValueError unless ``input_crop`` is 0 (none) or a centred window: smaller than the image by an even
    number of pixels, so that it is its own mirror image (flip TTA) and ten-crop's windows are integer shifts."""
    if input_crop and not (0 < input_crop < image_size and (image_size - input_crop) % 2 == 0):
        raise ValueError(f"input_crop must be 0 (none) or smaller than {image_size} by an even number of pixels, "
                         f"got {input_crop}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation switches; each is off at 0/False."""

    flip: bool = True
    shift: float = 0.1  # max translation as a fraction of the image side
    rotation: float = 10.0  # max rotation in degrees
    zoom: float = 0.1  # scale drawn from [1 - zoom, 1 + zoom]
    erasing: float = 0.0  # probability of erasing one random rectangle
    erasing_max_area: float = 0.25  # the rectangle covers 2 % to this fraction of the image (torchvision: 0.33)
    erasing_fill: str = "noise"  # one of ERASING_FILLS
    mixup: float = 0.0  # alpha of the Beta(alpha, alpha) mixing weight (0 = no mixup)
    fill_mode: str = "reflect"  # one of FILL_MODES, for pixels the warp brings in from outside the image
    crop: int = 0  # side of the central window the model sees (0: all); the warp then crops it at random

    def __post_init__(self):
        if not 0.0 <= self.shift <= 0.5:
            raise ConfigError(f"augment shift must be in [0, 0.5], got {self.shift}")
        if not 0.0 <= self.rotation <= 180.0:
            raise ConfigError(f"augment rotation must be in [0, 180] degrees, got {self.rotation}")
        if not 0.0 <= self.zoom < 1.0:
            raise ConfigError(f"augment zoom must be in [0, 1), got {self.zoom}")
        if not 0.0 <= self.erasing <= 1.0:
            raise ConfigError(f"augment erasing must be a probability in [0, 1], got {self.erasing}")
        if not 0.02 < self.erasing_max_area <= 1.0:
            raise ConfigError(f"augment erasing_max_area must be in (0.02, 1], got {self.erasing_max_area}")
        if self.erasing_fill not in ERASING_FILLS:
            raise ConfigError(f"augment erasing_fill must be one of {', '.join(ERASING_FILLS)}, "
                              f"got {self.erasing_fill!r}")
        if not self.mixup >= 0.0:
            raise ConfigError(f"augment mixup alpha must be >= 0, got {self.mixup}")
        if self.crop < 0:
            raise ConfigError(f"augment crop must be >= 0, got {self.crop}")
        if self.fill_mode not in FILL_MODES:
            raise ConfigError(f"augment fill_mode must be one of {', '.join(FILL_MODES)}, got {self.fill_mode!r}")

    @property
    def geometric(self) -> bool:
        return self.flip or self.shift > 0 or self.rotation > 0 or self.zoom > 0 or self.crop > 0


NO_AUGMENT = AugmentConfig(flip=False, shift=0.0, rotation=0.0, zoom=0.0, erasing=0.0)
