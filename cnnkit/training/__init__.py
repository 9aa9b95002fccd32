"""Fine-tuning and full training of classifier networks (see ``fit`` for how the pieces fit)."""

from cnnkit.options import FINETUNE, TRAIN, TrainOptions, preset

__all__ = ["FINETUNE", "TRAIN", "TrainOptions", "TrainResult", "preset", "run_training"]


def __getattr__(name: str):
    # run_training pulls in the data layer; `cnnkit --help` needs only the options.
    if name in ("run_training", "TrainResult"):
        from cnnkit.training import fit

        return getattr(fit, name)
    raise AttributeError(name)
