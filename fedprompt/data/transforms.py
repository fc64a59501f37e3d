"""CLIP image transforms from open_clip: train augmentation (random resized crop, bicubic, horizontal flip, CLIP
normalisation, as in CoOp/Dassl) and the plain test transform (resize + centre crop)."""

from __future__ import annotations


def clip_transforms(preprocess: dict, augment: bool = True) -> tuple:
    """Return ``(train_transform, test_transform)`` for a backbone's preprocessing config.

    Args:
        preprocess: ``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode`` (from the backbone).
        augment: ``False`` makes the train transform equal to the test transform (needed for feature caching).

    Returns two ``torchvision.transforms.Compose`` (open_clip and torchvision are imported here, not at import time).
    """
    import open_clip
    import torchvision.transforms as T

    size = preprocess.get("size", 224)
    common = dict(mean=preprocess.get("mean"), std=preprocess.get("std"),
                  interpolation=preprocess.get("interpolation", "bicubic"),
                  resize_mode=preprocess.get("resize_mode"))
    test = open_clip.image_transform(size, is_train=False, **common)
    if not augment:
        return test, test
    train = open_clip.image_transform(size, is_train=True, aug_cfg={"scale": (0.08, 1.0)}, **common)
    steps = list(train.transforms)
    steps.insert(1, T.RandomHorizontalFlip())
    return T.Compose(steps), test
