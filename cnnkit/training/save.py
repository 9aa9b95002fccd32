"""Writing a trained network as a run: the model, its history, plots, report and retrieval index."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cnnkit.kinds.network import BACKBONE_LAYER, FEATURE_LAYER, NetworkModel
from cnnkit.runs import Attachment, RunManifest, data_summary, write_run


@dataclass
class TrainingOutcome:
    """What a training run produced, ready to be written."""

    model: object  # the trained network, saved as model.keras
    predictor: object  # that network as the run predicts: {"probabilities", "features"} (inference_network)
    history: dict[str, list]
    update_ratios: list[dict[str, float]]
    diagnosis: list[str]
    metrics: dict[str, float | int | None]
    sanity: dict | None
    interrupted: bool
    best_epoch: int


def training_features(predictor, samples, image_size: int, batch_size: int):
    """Pooled features of the training images (the retrieval index of `similar`), as ``predictor`` pools them."""
    import keras

    from cnnkit.data import ImageStream
    from cnnkit.engines import inference_fn

    features_fn = inference_fn(keras.Model(predictor.input, predictor.output["features"]))
    stream = ImageStream([s.path for s in samples], image_size)
    rows, kept = stream.map_batches(lambda images: np.asarray(features_fn(images), np.float32), batch_size)
    features = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    return features, [samples[i].label for i in kept], [samples[i].path for i in kept]


def save_training_run(out: Path, outcome: TrainingOutcome, spec, options, dataset, splits: dict,
                      image_size: int, work: Path, replace: bool, skipped: int | Sequence = 0,
                      attach: Sequence[Attachment] = (), table_strategy: str | None = None) -> Path:
    """Write the run folder of a finetune or train run (see ``cnnkit.runs`` for the layout).

    Args:
        skipped: the unreadable files (or only their number).
    """
    skipped_files = [] if isinstance(skipped, int) else list(skipped)
    skipped = skipped if isinstance(skipped, int) else len(skipped_files)
    from cnnkit.options import command_line
    from cnnkit.similarity import write_index
    from cnnkit.training.network import probabilities_of
    from cnnkit.training.plots import plot_first_layer_filters, plot_history, plot_update_ratios

    model = outcome.model
    index = training_features(outcome.predictor, splits["train"], image_size, options.batch_size)

    def write_files(folder: Path) -> None:
        model.save(folder / "model.keras")
        write_index(folder, *index)
        shutil.copyfile(work / "history.csv", folder / "history.csv")
        plots = folder / "plots"
        plots.mkdir()
        plot_history(outcome.history, outcome.diagnosis, plots)
        plot_update_ratios(outcome.update_ratios, plots)
        plot_first_layer_filters(model.get_layer(BACKBONE_LAYER), plots / "first_layer_filters.png")
        (folder / "report.json").write_text(json.dumps(
            {"diagnosis": outcome.diagnosis, "update_ratios": outcome.update_ratios, "sanity": outcome.sanity,
             "metrics": outcome.metrics}, indent=2))
        if outcome.interrupted:
            shutil.copytree(work / "checkpoints", folder / "checkpoints")

    manifest = RunManifest(
        command=str(options.mode), strategy=table_strategy,
        command_line=command_line(str(options.mode), dataset.source, options),
        options=asdict(options), class_names=dataset.class_names, image_size=image_size, crop_pct=1.0,
        preprocessing=spec.preprocessing, data=data_summary(dataset, splits, skipped),
        metrics=outcome.metrics,
        model=NetworkModel(backbone=spec.name, weights=str(options.weights),
                           freeze=str(options.freeze) if options.mode == "finetune" else "none",
                           feature_layer=FEATURE_LAYER, flip=options.flip,
                           epochs_run=len(outcome.history.get("loss", [])), best_epoch=outcome.best_epoch,
                           interrupted=outcome.interrupted),
    )
    from cnnkit.reporting import run_attachments

    held_out = "test" if splits.get("test") and not outcome.interrupted else "val"
    evaluation = held_out_evaluation(probabilities_of(outcome.predictor), splits.get(held_out) or [],
                                     dataset.class_names, image_size, options.batch_size)
    hooks = run_attachments(evaluation, held_out, skipped_files, attach, dataset.excluded)
    return write_run(out, manifest, write_files, force=replace, attach=hooks)


def held_out_evaluation(model, samples, class_names, image_size: int, batch_size: int):
    """The trained model's probabilities on held-out images, for the run's report (``None`` without any)."""
    if not samples:
        return None
    from cnnkit.data import ImageStream
    from cnnkit.engines import inference_fn
    from cnnkit.evaluation import Evaluation

    predict = inference_fn(model)
    stream = ImageStream([s.path for s in samples], image_size)
    outputs, kept = stream.map_batches(lambda images: np.asarray(predict(images), np.float32), batch_size)
    if not len(kept):
        return None
    return Evaluation(list(class_names), np.array([samples[i].label for i in kept]), np.concatenate(outputs),
                      [samples[i].path for i in kept])
