"""Data augmentation as Keras preprocessing layers, active only while training.

The layers sit inside the model, after the raw-pixel input, so they run on
the accelerator when there is one and vanish at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit.options import Augment


@dataclass(frozen=True)
class Augmentation:
    """Strengths of each transform; 0 turns it off.

    ``crop`` approximates a random resized crop: a random zoom into the image
    of up to this share plus a random shift of up to half of it.
    """

    flip: bool = False
    crop: float = 0.0
    rotation: float = 0.0  # fraction of a full turn
    color: float = 0.0  # brightness, contrast and saturation jitter

    @classmethod
    def preset(cls, name: Augment | str) -> Augmentation:
        name = Augment.parse(name, "--augment")
        if name == Augment.light:
            return cls(flip=True, crop=0.1, rotation=0.0, color=0.0)
        if name == Augment.strong:
            return cls(flip=True, crop=0.25, rotation=0.05, color=0.2)
        return cls()

    def layers(self, seed: int = 0) -> list:
        from keras import layers

        result = []
        if self.flip:
            result.append(layers.RandomFlip("horizontal", seed=seed, name="aug_flip"))
        if self.crop:
            result.append(layers.RandomZoom((-self.crop, 0.0), fill_mode="reflect", seed=seed + 1, name="aug_zoom"))
            result.append(layers.RandomTranslation(self.crop / 2, self.crop / 2, fill_mode="reflect",
                                                   seed=seed + 2, name="aug_shift"))
        if self.rotation:
            result.append(layers.RandomRotation(self.rotation, fill_mode="reflect", seed=seed + 3, name="aug_rotate"))
        if self.color:
            result.append(layers.RandomColorJitter(value_range=(0, 255), brightness_factor=self.color,
                                                   contrast_factor=self.color, saturation_factor=self.color,
                                                   seed=seed + 4, name="aug_color"))
        return result
