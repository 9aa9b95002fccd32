"""The checks `auto` runs before it plans: cheap, and no forward pass.

- unreadable files (named);
- exact duplicates by content hash, within a split and across splits;
- held-out images copied into train (leaks): candidates are each held-out image's nearest
  training images by 16 x 16 grey pixels (not features: no network has to run), confirmed by the
  same pixel test `doctor` uses (``cnnkit.doctor.duplicates.find_copies``).

Label errors, outliers and image properties need features and cross-validated heads: that is
``cnnkit doctor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cnnkit.doctor.duplicates import find_copies

HELD_OUT = ("test", "val")
CANDIDATES = 10


@dataclass
class QuickCheck:
    """What the cheap checks found: (path, other) pairs and unreadable paths."""

    unreadable: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    leaks: list[tuple[str, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.unreadable or self.duplicates or self.leaks)

    def warnings(self) -> list[str]:
        """One line per kind of fault found, each saying what to do."""
        lines = []
        if self.leaks:
            lines.append(f"{len(self.leaks)} training image(s) are copies of test/validation images "
                         f"(e.g. {self.leaks[0][0]} = {self.leaks[0][1]}): the test score will flatter the model; "
                         "run `cnnkit doctor DATA --out DIR` and train with --exclude DIR/issues.csv")
        if self.duplicates:
            lines.append(f"{len(self.duplicates)} exact duplicate image(s) (e.g. {self.duplicates[0][0]} = "
                         f"{self.duplicates[0][1]}): they weigh twice in training")
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable file(s) left out (e.g. {self.unreadable[0][0]}: "
                         f"{self.unreadable[0][1]})")
        return lines

    def to_dict(self) -> dict:
        return {"unreadable": [list(u) for u in self.unreadable], "duplicates": [list(d) for d in self.duplicates],
                "leaks": [list(leak) for leak in self.leaks]}


def quick_checks(dataset) -> QuickCheck:
    """The cheap checks (module docstring) of a loaded ``cnnkit.data.Dataset``."""
    from cnnkit.content_hashes import content_hashes
    from cnnkit.doctor.pixels import read_pixels
    from cnnkit.neighbours import NeighbourIndex

    check = QuickCheck(unreadable=[(str(s.path), s.reason) for s in dataset.skipped])
    samples = [(name, s) for name, split in dataset.splits.items() for s in split]
    hashes = content_hashes([s.path for _, s in samples])
    # Thumbnails from doctor's pixel cache (by content hash), which this fills: `doctor` after `auto` decodes nothing.
    decoded, reasons = read_pixels([s.path for _, s in samples], hashes)
    for (_, sample), reason in zip(samples, reasons):
        if reason is not None:
            check.unreadable.append((str(sample.path), reason))
    readable = np.flatnonzero([reason is None for reason in reasons])
    samples = [samples[i] for i in readable]
    if not samples:
        return check

    rank = {name: i for i, name in enumerate(("train", "val", "test"))}
    first_of: dict[str, tuple[str, str]] = {}
    digest_of = {str(samples[i][1].path): hashes[row] for i, row in enumerate(readable)}
    for split, sample in sorted(samples, key=lambda item: (-rank.get(item[0], 0), str(item[1].path))):
        digest = digest_of[str(sample.path)]
        if not digest:  # gone since it was read
            continue
        if digest not in first_of:
            first_of[digest] = (split, str(sample.path))
            continue
        original_split, original = first_of[digest]
        pair = (str(sample.path), original)
        (check.leaks if original_split != split and split not in HELD_OUT else check.duplicates).append(pair)

    splits = np.array([split for split, _ in samples])
    held = np.flatnonzero(np.isin(splits, HELD_OUT))
    training = np.flatnonzero(~np.isin(splits, HELD_OUT))
    if len(held) and len(training) > 1:
        thumbnails = decoded.thumbnails[readable]
        side = thumbnails.shape[1]
        small = thumbnails.reshape(len(thumbnails), 16, side // 16, 16, side // 16).mean(axis=(2, 4))
        pixels = small.reshape(len(small), -1).astype(np.float32)
        pixels -= pixels.mean(axis=1, keepdims=True)
        index = NeighbourIndex.build(pixels[training])
        nearest, _ = index.search(index.embed(pixels[held]), min(CANDIDATES, len(training)))
        known = {leak[0] for leak in check.leaks}
        for match in find_copies(thumbnails, held, training[nearest], zoomed=decoded.zoomed[readable]):
            train_path = str(samples[match.original][1].path)
            if train_path not in known and digest_of[train_path] != digest_of[str(samples[match.copy][1].path)]:
                check.leaks.append((train_path, str(samples[match.copy][1].path)))
    return check
