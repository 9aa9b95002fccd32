"""Where a model looks: Grad-CAM heat maps, and occlusion sensitivity where there is no gradient.

Grad-CAM (Selvaraju et al., in the notes): the gradient of a class's score
(before the softmax) with respect to a stage's feature maps, averaged over
space, weights those maps; their weighted sum, kept where positive, is the
heat map. It is computed for

- a backbone's own ImageNet classifier (no run);
- a network run (finetune, train): through its nested backbone, pooling and
  classifier;
- a feature-head run with a linear head (logreg, linear-svm): scaler, PCA and
  the linear classifier are folded into one affine map of the pooled stage
  features (``fold_linear_head``), so the whole run is one differentiable
  function from pixels to class scores;
- an ensemble: each member's map for the ensemble's class, weighted as the
  ensemble weights the members.

Heads with no useful gradient (k-NN, RBF SVM) get occlusion sensitivity
instead: a grey patch slides over the image and the heat is how much the
class probability drops where it covers.

Maps are returned in the original image's pixel grid, 0..1, and 0 where the
model never looked (outside its centre crop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data import find_images, load_image
from cnnkit.data.images import square_crop_box
from cnnkit.errors import CnnkitError

GRAD_CAM = "grad-cam"
OCCLUSION = "occlusion"
LINEAR_HEADS = ("logreg", "linear-svm")


@dataclass
class ModelView:
    """What an explainer returns for one image at the model's input size.

    Attributes:
        probabilities: the model's class probabilities.
        class_index: the class explained.
        heat: 0..1 map over the model's input square (any resolution).
    """

    probabilities: np.ndarray
    class_index: int
    heat: np.ndarray


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


class Explainer:
    """Explains single images for one model.

    Attributes:
        class_names: the model's classes.
        image_size: its square input side.
        crop_pct: the share of the shorter side its centre crop keeps.
        method: ``GRAD_CAM`` or ``OCCLUSION``.
        layer: the stage whose maps are weighted (Grad-CAM).
    """

    class_names: list[str]
    image_size: int
    crop_pct: float
    method: str
    layer: str

    def view(self, image: np.ndarray, class_index: int | None) -> ModelView:
        raise NotImplementedError


# ---------------------------------------------------------------- Grad-CAM core

Forward = Callable  # float32 images -> ([(feature maps, mirrored)], class scores before softmax)


def grad_cam(forward: Forward, image: np.ndarray, class_index: int | None) -> ModelView:
    """Grad-CAM of one raw ``uint8`` image through ``forward``."""
    import tensorflow as tf

    x = tf.convert_to_tensor(image[None], tf.float32)
    with tf.GradientTape() as tape:
        # Watching the input records every operation, so gradients reach the
        # feature maps even when the weights are frozen (not watched by default).
        tape.watch(x)
        maps, logits = forward(x)
        logits = tf.cast(logits, tf.float32)
        probabilities = tf.nn.softmax(logits)[0].numpy()
        if class_index is None:
            class_index = int(np.argmax(probabilities))
        target = logits[0, class_index]
    gradients = tape.gradient(target, [m for m, _ in maps])
    heat = None
    for (feature_map, mirrored), gradient in zip(maps, gradients):
        feature_map = tf.cast(feature_map, tf.float32)[0]
        gradient = tf.zeros_like(feature_map) if gradient is None else tf.cast(gradient, tf.float32)[0]
        weights = tf.reduce_mean(gradient, axis=(0, 1))
        cam = tf.reduce_sum(feature_map * weights, axis=-1).numpy()
        cam = cam[:, ::-1] if mirrored else cam
        heat = cam if heat is None else heat + cam
    heat = np.maximum(heat, 0)
    return ModelView(probabilities, class_index, normalise(heat))


def normalise(heat: np.ndarray) -> np.ndarray:
    """Scale to 0..1 by the maximum; an all-zero map stays zero."""
    heat = np.nan_to_num(np.asarray(heat, np.float32))
    top = float(heat.max()) if heat.size else 0.0
    return heat / top if top > 0 else np.zeros_like(heat)


def class_scores(layer, inputs):
    """The scores before the softmax of a model's last layer (Dense or Activation), given its input."""
    from keras import ops

    kernel = getattr(layer, "kernel", None)
    if kernel is not None:
        scores = ops.matmul(ops.cast(inputs, "float32"), ops.cast(kernel, "float32"))
        return scores + ops.cast(layer.bias, "float32") if getattr(layer, "bias", None) is not None else scores
    if layer.__class__.__name__ == "Activation":  # MobileNetV3: conv logits, then a softmax layer
        return ops.cast(ops.reshape(inputs, (ops.shape(inputs)[0], -1)), "float32")
    raise CnnkitError(f"cannot find the class scores of layer {layer.name!r}")


def feature_map_layer(spec, model, layer: str):
    """The layer of ``model`` whose 4-D output ends ``layer``."""
    found = spec.stage_layer(model, layer)
    if len(found.output.shape) != 4:
        choices = [s for s in spec.layer_choices if s not in ("top", "conv5")]
        raise CnnkitError(f"--layer {layer}: {spec.name}'s last stage is not a feature map here; "
                          f"choose from {', '.join(choices)}")
    return found


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
        self._forward = lambda x: (lambda a, b: ([(a, False)], class_scores(last, b)))(*inner(x, training=False))
        self.class_names = imagenet_class_names()
        self.image_size, self.crop_pct = spec.input_size, spec.crop_pct

    def view(self, image, class_index=None):
        return grad_cam(self._forward, image, class_index)


class NetworkExplainer(Explainer):
    """Grad-CAM of a network run: augmentation (inactive) -> backbone -> pooling -> classifier."""

    method = GRAD_CAM

    def __init__(self, run, layer: str | None = None):
        import keras

        from cnnkit.backbones import get_backbone

        spec = get_backbone(run.model.backbone)
        self.layer = spec.check_stage(layer or "top")
        model = run.classifier().model
        backbone = next((l for l in model.layers if isinstance(l, keras.Model)), None)
        if backbone is None:
            raise CnnkitError(f"{run.path}: the model has no nested backbone to explain; re-create the run")
        maps = feature_map_layer(spec, backbone, self.layer)
        inner = keras.Model(backbone.input, [maps.output, backbone.output])
        position = model.layers.index(backbone)
        before = [l for l in model.layers[:position] if not isinstance(l, keras.layers.InputLayer)]
        pool = model.get_layer(run.model.feature_layer)
        last = model.layers[-1]

        flip = run.model.flip

        def forward(x):
            from keras import ops

            for layer_ in before:  # augmentation layers are the identity at inference
                x = layer_(x, training=False)
            feature_map, final = inner(x, training=False)
            maps, pooled = [(feature_map, False)], pool(final)
            if flip:  # the run averages each image's pooled features with its mirror image's
                mirror_map, mirror_final = inner(ops.flip(x, axis=2), training=False)
                maps.append((mirror_map, True))
                pooled = (pooled + pool(mirror_final)) / 2.0
            return maps, class_scores(last, pooled)

        self._forward = forward
        self.class_names, self.image_size, self.crop_pct = run.class_names, run.image_size, run.crop_pct

    def view(self, image, class_index=None):
        return grad_cam(self._forward, image, class_index)


def fold_linear_head(pipeline) -> tuple[np.ndarray, np.ndarray, bool]:
    """A fitted head pipeline's linear part as one affine map.

    scaler -> PCA (whitened or not) -> logistic regression or calibrated
    linear SVM are all affine, so their composition is ``x @ W + b``; for
    logistic regression those are its logits (softmax gives its
    probabilities), for a linear SVM the mean decision function of its
    calibration folds (whose sigmoid calibration is monotonic per class).

    Returns:
        (W, b, l2): ``W`` (features, classes), ``b`` (classes,), and whether
        the features are L2-normalised before the map (``Normalizer`` step).

    Raises:
        CnnkitError: the head is not linear (k-NN, RBF SVM).
    """
    steps = dict(pipeline.steps)
    classifier = steps["clf"]
    if hasattr(classifier, "calibrated_classifiers_"):
        svms = [c.estimator for c in classifier.calibrated_classifiers_]
        if not all(hasattr(s, "coef_") for s in svms):
            raise CnnkitError("the head is not linear")
        coef = np.mean([s.coef_ for s in svms], axis=0)
        intercept = np.mean([s.intercept_ for s in svms], axis=0)
    elif hasattr(classifier, "coef_"):
        coef, intercept = classifier.coef_, classifier.intercept_
    else:
        raise CnnkitError("the head is not linear")
    coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
    if coef.shape[0] == 1:  # binary: one score for the second class; softmax([0, s]) = sigmoid(s)
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    # Work backwards from the classifier: W maps this step's input to the scores.
    weight, bias = coef.T, intercept
    if "pca" in steps:
        pca = steps["pca"]
        components = pca.components_.T  # (inputs, k)
        if pca.whiten:
            components = components / np.sqrt(pca.explained_variance_)
        bias = bias - (pca.mean_ @ components) @ weight
        weight = components @ weight
    scaler = steps["scale"]
    scale = scaler.scale_ if scaler.scale_ is not None else np.ones(weight.shape[0])
    mean = scaler.mean_ if scaler.mean_ is not None else np.zeros(weight.shape[0])
    weight = weight / scale[:, None]
    bias = bias - mean @ weight
    return weight.astype(np.float32), bias.astype(np.float32), "l2" in steps


class FeatureHeadExplainer(Explainer):
    """Grad-CAM through a feature-head run with a linear head, folded into one affine layer."""

    method = GRAD_CAM

    def __init__(self, run, layer: str | None = None, head=None):
        import keras
        from keras import ops

        from cnnkit.backbones import get_backbone
        from cnnkit.features import build_backbone, grid_pool, stage_grid, unmirror
        from cnnkit.heads import load_head

        m = run.model
        spec = get_backbone(m.backbone)
        head = head if head is not None else load_head(run.file("head.skops"))
        weight, bias, l2 = fold_linear_head(head)
        self.layer = spec.check_stage(layer or m.layers[-1])
        base = build_backbone(spec, m.weights, run.image_size)
        stages = [spec.stage_key(l) for l in m.layers]
        target = spec.stage_key(self.layer)
        outputs = {s: feature_map_layer(spec, base, s).output for s in dict.fromkeys([*stages, target])}
        maps = keras.Model(base.input, outputs)
        grids = {s: stage_grid(spec, s, m.grid) for s in stages}
        weight, bias = ops.convert_to_tensor(weight), ops.convert_to_tensor(bias)

        def features(x, mirrored: bool = False):
            out = maps(x, training=False)
            # Pooled as the run's features were (cnnkit.features.FeatureExtractor); a mirror
            # image's grid regions put back in place.
            pooled = [grid_pool(ops.cast(out[s], "float32"), grids[s], m.pool) for s in stages]
            if mirrored:
                pooled = [unmirror(p, grids[s], ops) for p, s in zip(pooled, stages)]
            return out[target], ops.concatenate(pooled, axis=1)

        def forward(x):
            feature_map, pooled = features(x)
            found = [(feature_map, False)]
            if m.flip:  # the run averaged each image's features with its mirror image's
                mirror_map, mirror_pooled = features(ops.flip(x, axis=2), mirrored=True)
                found.append((mirror_map, True))
                pooled = (pooled + mirror_pooled) / 2
            if l2:
                pooled = pooled / ops.maximum(ops.norm(pooled, axis=1, keepdims=True), 1e-12)
            return found, ops.matmul(pooled, weight) + bias

        self._forward = forward
        self.class_names, self.image_size, self.crop_pct = run.class_names, run.image_size, run.crop_pct

    def view(self, image, class_index=None):
        return grad_cam(self._forward, image, class_index)


class OcclusionExplainer(Explainer):
    """Occlusion sensitivity of any classifier of raw ``uint8`` batches.

    A grey square of a seventh of the side slides over the image at half its
    size; each pixel's heat is the mean drop of the class probability over
    the positions that covered it.
    """

    method = OCCLUSION
    layer = "input"

    def __init__(self, classifier: Callable, class_names: Sequence[str], image_size: int, crop_pct: float,
                 batch_size: int = 32):
        self.classifier = classifier
        self.class_names, self.image_size, self.crop_pct = list(class_names), image_size, crop_pct
        self.batch_size = batch_size

    def view(self, image, class_index=None):
        size = image.shape[0]
        patch = max(1, size // 7)
        stride = max(1, patch // 2)
        starts = sorted(set(range(0, size - patch + 1, stride)) | {size - patch})
        positions = [(y, x) for y in starts for x in starts]
        probabilities = np.asarray(self.classifier(image[None]), np.float64)[0]
        if class_index is None:
            class_index = int(np.argmax(probabilities))
        heat = np.zeros((size, size), np.float64)
        covered = np.zeros((size, size), np.float64)
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start:start + self.batch_size]
            batch = np.repeat(image[None], len(chunk), axis=0)
            for i, (y, x) in enumerate(chunk):
                batch[i, y:y + patch, x:x + patch] = 127
            drops = probabilities[class_index] - np.asarray(self.classifier(batch), np.float64)[:, class_index]
            for (y, x), drop in zip(chunk, drops):
                heat[y:y + patch, x:x + patch] += drop
                covered[y:y + patch, x:x + patch] += 1
        heat = np.maximum(heat / np.maximum(covered, 1), 0)
        return ModelView(probabilities.astype(np.float32), class_index, normalise(heat))


class EnsembleExplainer(Explainer):
    """Each member's map for the ensemble's class, weighted as the ensemble weights its members."""

    def __init__(self, run, layer: str | None = None):
        from cnnkit.models import member_view

        self.run = run
        self.members = [(member, explainer_for(member, layer), weight) for member, weight in run.members()]
        self._member_view = member_view
        self.classifier = run.classifier()
        self.class_names, self.image_size, self.crop_pct = run.class_names, run.image_size, run.crop_pct
        methods = {e.method for _, e, _ in self.members}
        self.method = methods.pop() if len(methods) == 1 else "+".join(sorted(methods))
        self.layer = ",".join(dict.fromkeys(e.layer for _, e, _ in self.members))

    def view(self, image, class_index=None):
        probabilities = np.asarray(self.classifier(image[None]), np.float32)[0]
        if class_index is None:
            class_index = int(np.argmax(probabilities))
        name = self.class_names[class_index]
        size = self.image_size
        heat = np.zeros((size, size), np.float64)
        for member, explainer, weight in self.members:
            seen = self._member_view(image[None], self.crop_pct, member.crop_pct, member.image_size)[0]
            result = explainer.view(seen, member.class_names.index(name))
            # The member saw the centre ``member.crop_pct / crop_pct`` of the ensemble's input square.
            share = min(member.crop_pct / self.crop_pct, 1.0)
            heat += weight * place_in_box(result.heat, size, size, share)
        return ModelView(probabilities, class_index, normalise(heat))


def explainer_for(run, layer: str | None = None, batch_size: int = 32) -> Explainer:
    """The explainer of a loaded run: Grad-CAM where the model is differentiable, else occlusion."""
    if run.kind == "network":
        return NetworkExplainer(run, layer)
    if run.kind == "ensemble":
        return EnsembleExplainer(run, layer)
    if run.model.head in LINEAR_HEADS:
        return FeatureHeadExplainer(run, layer)
    return OcclusionExplainer(run.classifier(), run.class_names, run.image_size, run.crop_pct, batch_size)


def place_in_box(heat: np.ndarray, height: int, width: int, crop_pct: float) -> np.ndarray:
    """``heat`` over the centre square a model saw of a ``height`` x ``width`` image, in that image's grid.

    Outside the square the model did not look: zero there.
    """
    from PIL import Image

    left, top, right, bottom = square_crop_box(width, height, crop_pct)
    full = np.zeros((height, width), np.float32)
    if right <= left or bottom <= top:
        return full
    resized = Image.fromarray(np.asarray(heat, np.float32), mode="F").resize(
        (right - left, bottom - top), Image.Resampling.BILINEAR)
    full[top:bottom, left:right] = np.clip(np.asarray(resized, np.float32), 0, 1)
    return full


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
    result = explainer.view(pixels, class_index)
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
