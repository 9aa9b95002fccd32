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
    of up to this share plus a random shift of up to half of it. ``erase`` is
    the probability of random erasing (Zhong et al. 2017): a rectangle of 2-33 %
    of the image filled with noise, after the other transforms.
    """

    flip: bool = False
    crop: float = 0.0
    rotation: float = 0.0  # fraction of a full turn
    color: float = 0.0  # brightness, contrast and saturation jitter
    erase: float = 0.0  # probability of erasing a random rectangle

    @classmethod
    def preset(cls, name: Augment | str, erase: float = 0.0) -> Augmentation:
        """``--augment``'s transforms, with random erasing at probability ``erase`` (``--erase``)."""
        name = Augment.parse(name, "--augment")
        if name == Augment.light:
            return cls(flip=True, crop=0.1, erase=erase)
        if name == Augment.strong:
            return cls(flip=True, crop=0.25, rotation=0.05, color=0.2, erase=erase)
        return cls(erase=erase)

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
        if self.erase:
            # A fixed probability (factor (p, p)); fill_value None fills with clipped Gaussian noise. In
            # float32 under mixed precision too: the layer's coordinate grid (a float16 `range`) has no kernel.
            result.append(layers.RandomErasing(factor=(self.erase, self.erase), scale=(0.02, 0.33),
                                               value_range=(0, 255), seed=seed + 5, name="aug_erase",
                                               dtype="float32"))
        return result
