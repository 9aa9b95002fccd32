"""The ensemble kind (`ensemble` runs, auto's averaged plans): the weighted mean of its members' class probabilities.

Each member is a sealed run copied into ``members/<i>/`` and pinned by its
seal (``cnnkit.runs.Run.nested`` verifies it). The ensemble's images are
decoded at its largest member's size and crop; a member trained at another
size or crop sees its own centre crop of them, resized (``member_input``), and
its columns are put in the ensemble's class order. The graph does the same
with ``resize_view`` on symbolic tensors, so an exported ensemble predicts as
cnnkit does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from cnnkit.classifier import Classifier
from cnnkit.errors import CnnkitError
from cnnkit.kinds.registry import Forward, Kind, ModelDescription, Section, TriedRow, get_kind, register_kind
from cnnkit.saliency import Explainer, HeatMap, normalise, place_in_box


class EnsembleMember(Section):
    """One member of an ensemble: its copy's folder inside the run and its seal."""

    path: str
    seal: str
    weight: float = Field(gt=0)


class EnsembleModel(Section):
    """The weighted mean of its members' class probabilities."""

    kind: Literal["ensemble"] = "ensemble"
    members: list[EnsembleMember] = Field(min_length=1)


def check_same_classes(first, other) -> None:
    """Refuse a run whose class names are not ``first``'s (in any order), with one line naming both."""
    if sorted(first.class_names) != sorted(other.class_names):
        raise CnnkitError(f"{other.path}: its classes ({', '.join(other.class_names)}) differ from {first.path}'s "
                          f"({', '.join(first.class_names)}); an ensemble's members must have the same classes")


def members(run) -> list[tuple[object, float]]:
    """An ensemble's member runs, each verified like ``load_run`` and pinned by its seal, with its weight.

    Raises:
        CnnkitError: a member outside the folder, damaged, re-sealed since the ensemble was made,
            or with other classes.
    """
    found = []
    for member in run.model.members:
        nested = run.nested(member.path, member.seal)
        check_same_classes(run, nested)
        found.append((nested, member.weight))
    return found


def member_input(images, crop_pct: float, member_crop_pct: float, member_size: int) -> np.ndarray:
    """Raw ``uint8`` images decoded for an ensemble, as one of its members would have been given them.

    The member's share of the centre is cut out in whole pixels, then resized by ``resize_view``
    (what an exported ensemble does in its graph).
    """
    images = np.asarray(images)
    side = images.shape[1]
    # Both crops come from manifests (schema: 0 < crop_pct <= 1), so the cut is 1..side pixels, centred:
    # a slice inside the array, never an empty one however small a crafted member's crop is.
    keep = min(max(int(round(side * member_crop_pct / crop_pct)), 1), side)
    if keep == side == member_size:
        return images
    start = (side - keep) // 2
    return np.asarray(resize_view(images[:, start:start + keep, start:start + keep], member_size))


def resize_view(images, size: int):
    """``uint8`` images resized to ``size`` x ``size``: bilinear with half-pixel centres, rounded.

    Half-pixel centres put each output pixel where the decoder would have (docs/quality.md: a
    network trained at 28 px scores the same on images decoded at 128 and resized so as decoded
    at 28; corner-aligned sampling cost it 0.55 point). NumPy arrays and symbolic tensors alike.
    """
    from keras import ops

    resized = ops.image.resize(ops.cast(images, "float32"), (size, size), interpolation="bilinear")
    return ops.cast(ops.clip(ops.round(resized), 0, 255), "uint8")


class EnsembleClassifier(Classifier):
    """The weighted mean of the members' probabilities, each on its own view of the images."""

    def __init__(self, run, engine="auto", precision="float32", tta: bool = False):
        self.run = run
        self.image_size, self.crop_pct, self.classes = run.image_size, run.crop_pct, len(run.class_names)
        self.tta = tta
        self.members = []
        for member, weight in members(run):
            order = [member.class_names.index(name) for name in run.class_names]
            classifier = member.tta_classifier(engine, precision) if tta else member.classifier(engine, precision)
            self.members.append((member, classifier, weight, order))
        self.views = max(getattr(c, "views", 1) for _, c, _, _ in self.members)

    def batch(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """With ``tta``, each member averages its own chosen views; the plain views' mean comes too."""
        total, plain = 0.0, 0.0
        for member, classifier, weight, order in self.members:
            seen = member_input(images, self.run.crop_pct, member.crop_pct, member.image_size)
            probabilities, member_plain = classifier.batch(seen)
            total = total + weight * np.asarray(probabilities, np.float64)[:, order]
            if self.tta:
                plain = plain + weight * np.asarray(member_plain, np.float64)[:, order]
        return np.asarray(total, np.float32), (np.asarray(plain, np.float32) if self.tta else None)

    def __call__(self, images) -> np.ndarray:
        return self.batch(images)[0]

    def embed(self, images) -> np.ndarray:
        raise CnnkitError(f"{self.run.path}: an ensemble has no retrieval index; use `similar` with one of its "
                          "members (members/<i>)")


class EnsembleExplainer(Explainer):
    """Each member's map for the ensemble's class, weighted as the ensemble weights its members."""

    def __init__(self, run, layer=None, batch_size: int = 32):
        self.run = run
        self.members = [(member, get_kind(member.kind).explainer(member, layer, batch_size), weight)
                        for member, weight in members(run)]
        self.classifier = run.classifier("tf")
        self.class_names, self.image_size, self.crop_pct = run.class_names, run.image_size, run.crop_pct
        methods = {e.method for _, e, _ in self.members}
        self.method = methods.pop() if len(methods) == 1 else "+".join(sorted(methods))
        self.layer = ",".join(dict.fromkeys(e.layer for _, e, _ in self.members))

    def heat_map(self, image, class_index=None):
        probabilities = np.asarray(self.classifier(image[None]), np.float32)[0]
        if class_index is None:
            class_index = int(np.argmax(probabilities))
        name = self.class_names[class_index]
        size = self.image_size
        heat = np.zeros((size, size), np.float64)
        for member, explainer, weight in self.members:
            seen = member_input(image[None], self.crop_pct, member.crop_pct, member.image_size)[0]
            result = explainer.heat_map(seen, member.class_names.index(name))
            # The member saw the centre ``member.crop_pct / crop_pct`` of the ensemble's input square.
            share = min(member.crop_pct / self.crop_pct, 1.0)
            heat += weight * place_in_box(result.heat, size, size, share)
        return HeatMap(probabilities, class_index, normalise(heat))


@register_kind
class EnsembleKind(Kind):
    name = "ensemble"
    section = EnsembleModel

    def classifier(self, run, engine="auto", precision="float32"):
        return EnsembleClassifier(run, engine, precision)

    def tta_classifier(self, run, engine="auto", precision="float32"):
        """Each member with the views its own evidence chose (a member's views suit its own training)."""
        return EnsembleClassifier(run, engine, precision, tta=True)

    def tta_line(self, run) -> str:
        chosen = []
        for i, (member, _) in enumerate(members(run)):
            choice = member.tta_choice
            chosen.append(f"member {i} {choice.chosen if choice else 'none (no evidence recorded)'}")
        return "TTA: each member averages the views chosen on its own held-out images: " + ", ".join(chosen)

    def forward(self, run, images, stage=None, tag=""):
        """Each member's graph on the same input, probabilities averaged with the members' weights."""
        from keras import ops

        total, weights = None, 0.0
        for i, (member, weight) in enumerate(members(run)):
            if member.crop_pct != run.crop_pct:
                raise CnnkitError(f"{run.path}: member {member.path} crops {member.crop_pct} of the image, the "
                                  f"ensemble {run.crop_pct}; cnnkit builds graphs of ensembles whose members share "
                                  "one crop")
            # A smaller member sees the ensemble's image resized as member_input resizes it.
            seen = images if member.image_size == run.image_size else resize_view(images, member.image_size)
            order = [member.class_names.index(name) for name in run.class_names]
            found = get_kind(member.kind, member.path).forward(member, seen, tag=f"{tag}_m{i}")
            probabilities = ops.take(found.probabilities, order, axis=-1) * weight
            total = probabilities if total is None else total + probabilities
            weights += weight
        return Forward(total / weights)

    def explainer(self, run, layer=None, batch_size=32):
        return EnsembleExplainer(run, layer, batch_size)

    def mirror_symmetric(self, run) -> bool:
        """When every member is; their sealed manifests tell (no member file is hashed here)."""
        nested = [run.nested(member.path, member.seal, verify=False) for member in run.model.members]
        return all(get_kind(m.kind, m.path).mirror_symmetric(m) for m in nested)

    def describe(self, manifest) -> ModelDescription:
        return ModelDescription("An ensemble: the weighted mean of its members' class probabilities.",
                                [("members", len(manifest.model.members))])

    def report_sections(self, manifest, folder: Path) -> list[str]:
        from cnnkit.reporting.markup import number, read_json, table

        rows = []
        for i, member in enumerate(manifest.model.members):
            data = read_json(folder / member.path / "manifest.json", {}) or {}
            model = data.get("model") or {}
            metrics = data.get("metrics") or {}
            what = model.get("kind", "?")
            if model.get("kind") == "feature_head":
                what = (f"feature head: {model.get('backbone')} {','.join(model.get('layers') or [])} + "
                        f"{model.get('head')}")
            elif model.get("kind") == "network":
                what = f"{data.get('command')}: {model.get('backbone')}, frozen through {model.get('freeze')}"
            rows.append((i, member.path, what, f"{member.weight:.3f}", number(metrics.get("cv_accuracy")),
                         number(metrics.get("val_accuracy")), number(metrics.get("test_accuracy")),
                         member.seal[:12]))
        return ["<h2>Members</h2><p>Each member is a sealed copy inside this run, pinned by its seal; the ensemble "
                "averages their probabilities with these weights.</p>"
                + table(["#", "folder", "model", "weight", "CV", "validation", "test", "seal"], rows,
                        [True, False, False, True, True, True, True, False])]

    def tried(self, run) -> list[TriedRow]:
        """The candidates its members scored, member by member, named by backbone."""
        rows = []
        for member in run.model.members:
            nested = run.nested(member.path, member.seal, verify=False)
            backbone = getattr(nested.model, "backbone", "")
            rows += [row.model_copy(update={"layers": f"{backbone}: {row.layers}"})
                     for row in get_kind(nested.kind, nested.path).tried(nested)]
        return rows
