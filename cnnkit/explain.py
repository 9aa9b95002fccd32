"""`cnnkit explain`: where a model looks, as heat maps over image files.

The maps come from ``cnnkit.saliency``: Grad-CAM for a backbone's own
ImageNet classifier (no run) and for every run whose kind has class scores to
differentiate (networks, feature heads with a linear head: scaler, PCA and
the classifier folded into one affine map, ``cnnkit.head_graph``), through the
kind's own forward pass (``cnnkit.kinds``); occlusion sensitivity where there
is no useful gradient (k-NN and RBF-SVM heads); an ensemble averages its
members' maps with its weights.

Maps are returned in the original image's pixel grid, 0..1, and 0 where the
model never looked (outside its centre crop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data import find_images, load_image
from cnnkit.errors import CnnkitError
from cnnkit.saliency import GRAD_CAM, Explainer, class_scores, feature_map_layer, grad_cam, place_in_box


@dataclass
class Explanation:
    """One explained image."""

    path: Path
    label: str
    class_index: int
    score: float
    method: str
    layer: str
    heatmap: np.ndarray = field(repr=False)
    overlay_path: Path | None = None
    heatmap_path: Path | None = None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "label": self.label, "class_index": self.class_index,
                "score": self.score, "method": self.method, "layer": self.layer,
                "overlay": str(self.overlay_path) if self.overlay_path else None,
                "heatmap": str(self.heatmap_path) if self.heatmap_path else None}


class ImageNetExplainer(Explainer):
    """Grad-CAM of a backbone's own ImageNet classifier."""

    method = GRAD_CAM

    def __init__(self, backbone: str, weights: str = "imagenet", layer: str | None = None):
        import keras

        from cnnkit.backbones import get_backbone, imagenet_class_names

        spec = get_backbone(backbone)
        self.layer = spec.check_stage(layer or "top")
        model = spec.build(weights=weights, include_top=True)
        # With the classifier on top, the model's last layer is the softmax: name the stage's own layer.
        maps = feature_map_layer(spec, model, spec.stage_key(self.layer))
        last = model.layers[-1]
        inner = keras.Model(model.input, [maps.output, last.input])
        self._forward = lambda x: (lambda a, b: ([(a, 0, False)], class_scores(last, b)))(*inner(x, training=False))
        self.class_names = imagenet_class_names()
        self.image_size, self.crop_pct = spec.input_size, spec.crop_pct

    def heat_map(self, image, class_index=None):
        return grad_cam(self._forward, image, class_index)


def explainer_for(run, layer: str | None = None, batch_size: int = 32) -> Explainer:
    """The explainer of a loaded run, as its kind makes it: Grad-CAM where the model is differentiable, else occlusion."""
    from cnnkit.kinds import get_kind

    return get_kind(run.kind, run.path).explainer(run, layer, batch_size)


def resolve_class(text: str | None, class_names: Sequence[str]) -> int | None:
    """``--class``: a class name, or an index into ``class_names``."""
    if text is None:
        return None
    if text in class_names:
        return list(class_names).index(text)
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.strip().lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(class_names):
            return index
        raise CnnkitError(f"--class {text}: no class with that index; use 0..{len(class_names) - 1}")
    shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    raise CnnkitError(f"--class {text!r}: not a class of the model ({shown}); give a class name or an index")


def explain_image(explainer: Explainer, path: Path, class_index: int | None = None) -> Explanation:
    """Explain one image file; the heat map comes back in the file's own pixel grid."""
    original = load_image(path)
    pixels = load_image(path, explainer.image_size, explainer.crop_pct)
    result = explainer.heat_map(pixels, class_index)
    heat = place_in_box(result.heat, original.shape[0], original.shape[1], explainer.crop_pct)
    return Explanation(Path(path), explainer.class_names[result.class_index], result.class_index,
                       float(result.probabilities[result.class_index]), explainer.method, explainer.layer, heat)


def explain(inputs: Sequence[str | Path], run_path: str | Path | None = None, class_name: str | None = None,
            layer: str | None = None, out: str | Path | None = None, backbone: str | None = None,
            weights: str = "imagenet", progress: Callable[[int, int], None] | None = None):
    """Explain image files with a run, or with a backbone's ImageNet classifier when ``run_path`` is ``None``.

    Args:
        inputs: files, folders or glob patterns.
        class_name: the class to explain (a name or an index); default the predicted one.
        layer: the stage whose feature maps Grad-CAM weighs; default the last.
        out: folder for ``<stem>.png`` (overlay) and ``<stem>.npy`` (heat map);
            ``None`` writes nothing.

    Returns:
        (explanations, skipped files).
    """
    from cnnkit.backbones.registry import DEFAULT_BACKBONE
    from cnnkit.data import SkippedFile, UnreadableImageError

    paths, problems = find_images(list(inputs))
    if run_path is None:
        explainer = ImageNetExplainer(backbone or DEFAULT_BACKBONE, weights, layer)
    else:
        from cnnkit.runs import load_run

        explainer = explainer_for(load_run(run_path), layer)
    target = resolve_class(class_name, explainer.class_names)
    names = output_stems(paths)
    if out is not None:
        refuse_overwriting_inputs(paths, names, Path(out))
    explanations, skipped = [], list(problems)
    for done, (path, stem) in enumerate(zip(paths, names)):
        try:
            explanation = explain_image(explainer, path, target)
        except UnreadableImageError as error:
            skipped.append(SkippedFile(path, str(error).removeprefix(f"{path}: ")))
            continue
        if out is not None:
            write_explanation(explanation, Path(out), stem)
        explanations.append(explanation)
        if progress:
            progress(done + 1, len(paths))
    return explanations, skipped


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output name per input: its stem, with ``-2``, ``-3`` ... for repeated stems."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def refuse_overwriting_inputs(paths: Sequence[Path], stems: Sequence[str], out: Path) -> None:
    inputs = {p.resolve() for p in paths}
    for stem in stems:
        for suffix in (".png", ".npy"):
            if (out / f"{stem}{suffix}").resolve() in inputs:
                raise CnnkitError(f"--out {out}: would overwrite the input {out / (stem + suffix)}; "
                                  "choose another folder")


def write_explanation(explanation: Explanation, out: Path, stem: str) -> None:
    """``out/<stem>.npy`` (float32 heat map) and ``out/<stem>.png`` (overlay with colour bar and title)."""
    from cnnkit.paths import atomic_write

    heatmap_path = atomic_write(out / f"{stem}.npy",
                                lambda tmp: np.save(tmp, explanation.heatmap.astype(np.float32), allow_pickle=False))
    overlay_path = out / f"{stem}.png"
    plot_overlay(load_image(explanation.path), explanation.heatmap,
                 f"{explanation.label}  {explanation.score:.3f}  ({explanation.method}, {explanation.layer})",
                 overlay_path)
    explanation.heatmap_path, explanation.overlay_path = heatmap_path, overlay_path


def plot_overlay(image: np.ndarray, heat: np.ndarray, title: str, path: Path, max_side: int = 640) -> None:
    """The heat map over the image, jet colours, with a colour bar and ``title`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from cnnkit.paths import atomic_write

    height, width = image.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor < 1.0:  # a display copy; the .npy keeps the full grid
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    aspect = image.shape[1] / image.shape[0]
    fig, ax = plt.subplots(figsize=(min(4.5 * aspect, 9) + 1.2, 4.5))
    ax.imshow(image)
    shown = ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
