"""Fine-tuning and full training of classifier networks."""

from cnnkit.training.fit import TrainOptions, TrainResult, run_training

__all__ = ["TrainOptions", "TrainResult", "run_training"]
