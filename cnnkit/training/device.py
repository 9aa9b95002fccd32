"""Where training runs: CPU, one GPU or several, and the precision that goes with it.

``setup_device`` returns what it chose instead of setting it for the whole
process where TensorFlow allows: forcing the CPU uses a one-device strategy
rather than hiding the GPUs, and mixed precision is a dtype policy applied
only while the network is built (``DeviceSetup.precision``). Two switches
are process-wide by TensorFlow's design: op determinism and the global seeds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from cnnkit.errors import CnnkitError
from cnnkit.options import Device


@dataclass
class DeviceSetup:
    """The chosen devices.

    Attributes:
        strategy: the ``tf.distribute`` strategy to build and train under.
        description: in words, for the user.
        dtype_policy: "mixed_float16" on GPUs, else "float32".
    """

    strategy: object
    description: str
    dtype_policy: str = "float32"

    @contextlib.contextmanager
    def precision(self):
        """Build layers under this setup's dtype policy, then put the previous one back."""
        import keras

        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.dtype_policy)
        try:
            yield
        finally:
            keras.config.set_dtype_policy(previous)


def setup_device(device: Device | str = Device.auto, deterministic: bool = False, seed: int = 0) -> DeviceSetup:
    """Pick CPU or GPU(s) for training.

    Raises:
        CnnkitError: ``--device gpu`` with no GPU visible.
    """
    import keras
    import tensorflow as tf

    device = Device.parse(device, "--device")
    gpus = tf.config.list_logical_devices("GPU")
    if device == Device.gpu and not gpus:
        raise CnnkitError("--device gpu: no GPU visible to TensorFlow (see `cnnkit info`)")
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    if device == Device.cpu and gpus:
        return DeviceSetup(tf.distribute.OneDeviceStrategy("/cpu:0"), "CPU (GPUs present but not used)")
    if not gpus:
        return DeviceSetup(tf.distribute.get_strategy(), "CPU")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.OneDeviceStrategy(gpus[0].name)
    return DeviceSetup(strategy, f"{len(gpus)} GPU(s), mixed precision", "mixed_float16")
