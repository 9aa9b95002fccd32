"""cnnkit: transfer learning for image classification.

The package imports nothing heavy at import time; TensorFlow is loaded inside
the functions that need it so that ``cnnkit --help`` stays fast.
"""

from cnnkit.errors import CnnkitError

__version__ = "0.1.0"

__all__ = ["CnnkitError", "__version__"]
