"""Test-time augmentation: class probabilities averaged over crops and flips of each image.

As VGG and GoogLeNet evaluate: the image as the model usually sees it, plus
the centre and the four corners cropped to ``crop`` of its side (each resized
back to the model's input size), each also mirrored left to right. The views
are made from the already decoded input batch in one ``tf.image.crop_and_resize``
call per view, so any classifier of raw ``uint8`` batches -- every kind of run --
gains TTA without knowing about it.

Which views help depends on the run: a network trained on random crops and flips
has seen such views, a feature head fitted on whole images has not (docs/see.md
measured -3.8 points for its 87.5 % crops). So every run measures, when it is
made, the plain image against a few view sets (``CANDIDATES``) on its held-out
images (``choose``) and records the scores and its choice in ``tta.json``;
``--tta`` averages the chosen views, or none where none clearly helped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cnnkit.classifier import Classifier

# (top, left) of each crop as a share of the room left around it: centre, then the four corners.
_PLACES = ((0.5, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))


@dataclass(frozen=True)
class TTA:
    """Which views to average.

    Attributes:
        scales: crop sides as shares of the image side; 1.0 is the whole
            image (one view), a smaller share gives the centre and four corners.
        flip: add the mirror image of every view.
    """

    scales: tuple[float, ...] = (1.0, 0.875)
    flip: bool = True

    def boxes(self) -> list[tuple[float, float, float, float, bool]]:
        """Every view as (y1, x1, y2, x2, mirrored) in normalised coordinates; the plain image first."""
        boxes = []
        for scale in self.scales:
            places = _PLACES[:1] if scale >= 1.0 else _PLACES
            for top, left in places:
                y1, x1 = top * (1 - scale), left * (1 - scale)
                boxes.append((y1, x1, y1 + scale, x1 + scale))
        flips = (False, True) if self.flip else (False,)
        return [(*box, mirrored) for mirrored in flips for box in boxes]

    @property
    def views(self) -> int:
        return len(self.boxes())

    def for_run(self, run) -> TTA:
        """The views ``run`` needs: none mirrored when the run averages each image with its mirror
        already (``Run.mirror_symmetric``), as a mirrored view would repeat its plain view's probabilities."""
        return replace(self, flip=False) if self.flip and run.mirror_symmetric else self


def views(images, tta: TTA = TTA()):
    """Yield each view of a batch of raw ``uint8`` images, same shape and dtype, the plain batch first."""
    import tensorflow as tf

    images = np.asarray(images)
    count, height, width = images.shape[:3]
    pixels = tf.convert_to_tensor(images, tf.float32)
    indices = tf.range(count, dtype=tf.int32)
    for y1, x1, y2, x2, mirrored in tta.boxes():
        if (y1, x1, y2, x2) == (0.0, 0.0, 1.0, 1.0):
            view = images
        else:
            boxes = tf.tile(tf.constant([[y1, x1, y2, x2]], tf.float32), [count, 1])
            view = tf.image.crop_and_resize(pixels, boxes, indices, (height, width), method="bilinear")
            view = np.clip(np.rint(view.numpy()), 0, 255).astype(np.uint8)
        yield np.ascontiguousarray(view[:, :, ::-1]) if mirrored else view


class TTAClassifier(Classifier):
    """A classifier of raw ``uint8`` batches that averages another one's probabilities over views.

    ``batch`` returns the plain view's probabilities beside the average, so a caller can report
    the accuracy with and without TTA from one pass (``FilePredictions.plain``). Files are decoded
    and classified view by view (a feature head's cache holds the plain view only), except with the
    plain view alone, which is the inner classifier's own.
    """

    def __init__(self, classifier: Classifier | Callable, tta: TTA = TTA()):
        self.classifier = classifier
        self.tta = tta
        self.views = tta.views
        # A plain callable of batches works too, for batches (files need a Classifier's decoding size).
        self.image_size = getattr(classifier, "image_size", None)
        self.crop_pct = getattr(classifier, "crop_pct", 1.0)
        self.classes = getattr(classifier, "classes", None)

    def batch(self, images) -> tuple[np.ndarray, np.ndarray]:
        total, plain = None, None
        for i, view in enumerate(views(images, self.tta)):
            probabilities = np.asarray(self.classifier(view), np.float64)
            if i == 0:
                plain = probabilities.astype(np.float32)
            total = probabilities if total is None else total + probabilities
        return (total / self.tta.views).astype(np.float32), plain

    def __call__(self, images) -> np.ndarray:
        return self.batch(images)[0]

    def predict_files(self, paths, batch_size: int = 32, progress=None):
        """With the plain view alone, the inner classifier's own (a feature head's from the cache)."""
        if self.tta.views > 1 or not hasattr(self.classifier, "predict_files"):
            return super().predict_files(paths, batch_size, progress)
        found = self.classifier.predict_files(paths, batch_size, progress)
        return replace(found, plain=found.probabilities.copy())


# --- Which views help a run: chosen at training time on held-out evidence, recorded in tta.json ---

CHOICE_FILE = "tta.json"
# The zoom of `--augment light` (cnnkit.training.augment): a network trained with it has seen such crops.
ZOOM = 0.9
CANDIDATES: dict[str, TTA] = {"mirror": TTA((1.0,), True), "zoom": TTA((1.0, ZOOM), False),
                              "zoom+mirror": TTA((1.0, ZOOM), True)}
NONE = TTA((1.0,), False)
# Cap on the held-out images the views are measured on: the cost is views x images forward passes.
EVIDENCE_IMAGES = 300
# Fewer held-out images than this choose nothing: one image would be two points of accuracy or more.
MIN_EVIDENCE = 50


def candidates_for(mirror_symmetric: bool) -> dict[str, TTA]:
    """The view sets worth measuring: none mirrored for a run that averages each image with its mirror."""
    return {name: t for name, t in CANDIDATES.items() if not (mirror_symmetric and t.flip)}


def all_boxes(candidates: dict[str, TTA]) -> list[tuple]:
    """Every view any candidate needs, once each, the plain image first (as ``TTA.boxes``)."""
    boxes = list(NONE.boxes())
    for tta in candidates.values():
        boxes += [b for b in tta.boxes() if b not in boxes]
    return boxes


class ViewScore(BaseModel):
    """A view set's accuracy and log loss on the evidence images."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Literal["none", "mirror", "zoom", "zoom+mirror"]
    views: int = Field(ge=1, le=64)
    accuracy: float = Field(ge=0, le=1)
    log_loss: float = Field(ge=0)
    # Images the views classify right and the plain image wrong, and the reverse.
    fixed: int = Field(ge=0)
    broken: int = Field(ge=0)


class TTAChoice(BaseModel):
    """What a run's ``tta.json`` records: the view sets measured on held-out images, and the one chosen.

    Read strictly from a run's sealed file (JSON, a fixed set of names and bounded numbers): nothing
    in it is executed or used as a path.
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal[1] = 1
    evidence: Literal["validation", "out-of-fold"]
    images: int = Field(ge=1)
    scores: list[ViewScore] = Field(min_length=1, max_length=8)
    chosen: Literal["none", "mirror", "zoom", "zoom+mirror"]
    # The view sets the run was trained on (its augmentation): chosen on weaker evidence (``choose``).
    seen: list[Literal["mirror", "zoom", "zoom+mirror"]] = Field(default_factory=list, max_length=3)

    @model_validator(mode="after")
    def _scores_name_the_plain_image_and_the_choice(self) -> TTAChoice:
        # line() and the report look both up: a file without them is refused here, not a StopIteration there.
        names = [s.name for s in self.scores]
        if len(set(names)) != len(names) or "none" not in names or self.chosen not in names:
            raise ValueError("scores must name each view set once, the plain image ('none') and the chosen one")
        if len(set(self.seen)) != len(self.seen) or not set(self.seen) <= set(names):
            raise ValueError("seen must name measured view sets, each once")
        return self

    @property
    def tta(self) -> TTA:
        return CANDIDATES.get(self.chosen, NONE)

    def score(self, name: str) -> ViewScore:
        return next(s for s in self.scores if s.name == name)

    def line(self) -> str:
        """One line saying what --tta does for the run, and why."""
        plain = self.score("none")
        where = f"{self.images:,} {'validation' if self.evidence == 'validation' else 'out-of-fold training'} images"
        if self.images < MIN_EVIDENCE:
            return (f"TTA: this run had only {where} to measure views on ({MIN_EVIDENCE} needed to choose), "
                    "so --tta predicts as without it")
        if self.chosen == "none":
            best = max((s for s in self.scores if s.name != "none"), key=lambda s: s.fixed - s.broken,
                       default=None)
            tried = (f" (best: {best.name} {best.accuracy:.3f} vs {plain.accuracy:.3f}, fixing {best.fixed} and "
                     f"breaking {best.broken})") if best else ""
            return (f"TTA: no view set clearly beat the plain image on this run's {where}{tried}, "
                    "so --tta predicts as without it")
        chosen = self.score(self.chosen)
        trained = ", of the kind it was trained on" if self.chosen in self.seen else ""
        return (f"TTA: {self.chosen} ({chosen.views} views{trained}), chosen on this run's {where}: "
                f"{chosen.accuracy:.3f} vs {plain.accuracy:.3f} without (fixing {chosen.fixed}, "
                f"breaking {chosen.broken})")


def choose(view_probabilities: dict[tuple, np.ndarray], labels, candidates: dict[str, TTA],
           evidence: str, seen: Collection[str] = ()) -> TTAChoice:
    """Score the plain image and each candidate view set on held-out images, and pick one.

    A view set is chosen only when it is clearly better than the plain image: of the images on which
    the two disagree about being right, the views fix more than they break by at least two standard
    deviations of a fair coin (a sign test: ``fixed - broken >= 2 sqrt(fixed + broken)``), and the log
    loss falls. A set the run was trained on (``seen``: a network's random flips and zooms) needs only
    to fix at least as many as it breaks and to lower the log loss: its views are images like those the
    network learnt from, and averaging them is the multi-crop evaluation of the lecture notes, a gain
    too small for 200 validation images to prove (a Lite0 `finetune --freeze conv4` at 100 images per
    class: zoom+mirror fixed 6 and broke 2 of 200 validation images, and was +0.8 points on 2,000 test
    images). Of those, the one fixing the most on balance (fewer views on a tie); with fewer than
    ``MIN_EVIDENCE`` images, none. A gain of a few lucky images is noise at these sizes (on 300
    out-of-fold images a Lite0 head's zoom looked 2 points better and its test images did not move;
    docs/see.md), and `--tta` must not cost a run accuracy (-3.8 points measured for a feature head's
    87.5 % crops before views were chosen per run).

    Args:
        view_probabilities: each view's box (``TTA.boxes``) -> the held-out images' probabilities.
        labels: the images' classes (columns of the probabilities).
    """
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    plain_right = view_probabilities[NONE.boxes()[0]].argmax(axis=1) == labels

    def score(name: str, tta: TTA) -> ViewScore:
        probabilities = np.mean([view_probabilities[b] for b in tta.boxes()], axis=0)
        right = probabilities.argmax(axis=1) == labels
        log_loss = float(-np.mean(np.log(np.clip(probabilities[rows, labels], 1e-7, 1.0))))
        return ViewScore(name=name, views=tta.views, accuracy=float(np.mean(right)), log_loss=log_loss,
                         fixed=int(np.sum(right & ~plain_right)), broken=int(np.sum(plain_right & ~right)))

    plain = score("none", NONE)
    scores = [plain] + [score(name, tta) for name, tta in candidates.items()]
    seen = [name for name in candidates if name in seen]

    def clearly_better(s: ViewScore) -> bool:
        needed = 0 if s.name in seen else max(1.0, 2 * np.sqrt(s.fixed + s.broken))
        return s.fixed - s.broken >= needed and s.log_loss < plain.log_loss

    better = [s for s in scores[1:] if clearly_better(s)]
    chosen = max(better, key=lambda s: (s.fixed - s.broken, -s.views)).name if better else "none"
    if len(labels) < MIN_EVIDENCE:
        chosen = "none"
    return TTAChoice(evidence=evidence, images=len(labels), scores=scores, chosen=chosen, seen=seen)


def seen_candidates(flip: bool, zoom: float) -> list[str]:
    """The candidate view sets a network trained with random flips (``flip``) and random zooms into up
    to ``zoom`` of the side (``cnnkit.training.augment``) has seen: ``ZOOM``'s crops need ``zoom`` >= 0.1."""
    zoomed = zoom >= round(1 - ZOOM, 6)
    return [name for name, tta in CANDIDATES.items()
            if (tta.flip <= flip) and (len(tta.scales) == 1 or zoomed)]


def map_views(function: Callable, images: np.ndarray, boxes: list[tuple], batch_size: int = 32) -> dict:
    """``function`` (a batch of raw ``uint8`` images -> rows) of every view (``boxes`` as ``TTA.boxes``
    gives them) of a stack of images, batch by batch: box -> rows of all the images."""
    found: dict[tuple, list] = {b: [] for b in boxes}
    for start in range(0, len(images), batch_size):
        for box, view in zip(boxes, views(images[start:start + batch_size], _Boxes(tuple(boxes)))):
            found[box].append(np.asarray(function(view)))
    return {b: np.concatenate(rows) for b, rows in found.items()}


@dataclass(frozen=True)
class _Boxes:
    """Views given box by box (all ``views`` asks of a ``TTA``)."""

    fixed: tuple

    def boxes(self) -> list[tuple]:
        return list(self.fixed)
