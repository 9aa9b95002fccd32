"""Finding, decoding and streaming labelled images."""

from cnnkit.data.dataset import (
    ClassSummary,
    Dataset,
    Sample,
    SkippedFile,
    find_images,
    load_dataset,
    per_class_order,
    sample_per_class,
    split_dataset,
    stratified_split,
)
from cnnkit.data.exclude import left_out_line, load_excluding, read_exclusions
from cnnkit.data.images import IMAGE_SUFFIXES, UnreadableImageError, load_image
from cnnkit.data.pipeline import ImageStream

__all__ = [
    "ClassSummary", "Dataset", "IMAGE_SUFFIXES", "ImageStream", "Sample", "SkippedFile",
    "UnreadableImageError", "find_images", "left_out_line", "load_dataset", "load_excluding", "load_image",
    "per_class_order", "read_exclusions", "sample_per_class", "split_dataset", "stratified_split",
]
