"""Fine-tuning and full training of classifier networks."""

from cnnkit.training.fit import TrainOptions, TrainResult, resume_options, run_training

__all__ = ["TrainOptions", "TrainResult", "resume_options", "run_training"]
