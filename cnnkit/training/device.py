"""Where training runs: CPU, one GPU, several GPUs, or several machines, and the precision that goes with it.

``setup_device`` returns what it chose instead of setting it for the whole
process where TensorFlow allows: forcing the CPU uses a one-device strategy
rather than hiding the GPUs, and mixed precision is a dtype policy applied
only while the network is built (``DeviceSetup.precision``). Three switches
are process-wide by TensorFlow's design: op determinism, the global seeds,
and the cluster of a multi-worker run.

Several machines: when the ``TF_CONFIG`` environment variable describes a
cluster of more than one task (the format ``tf.distribute`` and cluster
managers such as Kubernetes' training operators use), training runs under
``tf.distribute.MultiWorkerMirroredStrategy``. Every worker runs the same
command; the global batch (``--batch-size``) is split across them; the
chief (task ``chief``, else ``worker`` 0) writes the run.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

from cnnkit.errors import CnnkitError
from cnnkit.options import Device


@dataclass
class DeviceSetup:
    """The chosen devices.

    Attributes:
        strategy: the ``tf.distribute`` strategy to build and train under.
        description: in words, for the user.
        dtype_policy: "mixed_float16" on GPUs, else "float32".
        workers: how many processes train together (1 without ``TF_CONFIG``).
        task: this process's task in ``TF_CONFIG`` ("worker-1"), "" when alone.
        chief: whether this process writes the run.
    """

    strategy: object
    description: str
    dtype_policy: str = "float32"
    workers: int = 1
    task: str = ""
    chief: bool = True
    _sum: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def replicas(self) -> int:
        """Model copies the global batch is split across (devices over all workers)."""
        return int(self.strategy.num_replicas_in_sync)

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

    def agree(self, what: str, value: int, remedy: str = "give every worker the same DATA and options") -> None:
        """Check that every worker computed the same ``value``; a no-op for one worker.

        Workers that disagree on the data or the checkpoint they start from
        would run different numbers of steps and block each other forever in
        the gradient exchange; this stops them at the start with a message.

        Raises:
            CnnkitError: the workers disagree.
        """
        if self.workers == 1:
            return
        # The chief's value to everyone, then a count of the workers that differ
        # from it: the same count, and so the same decision, on every worker.
        chief_value = self.chief_value(value)
        if self._total(int(value != chief_value)):
            raise CnnkitError(f"the {self.workers} workers see different {what}; {remedy}")

    def chief_value(self, value: int) -> int:
        """The chief's ``value`` on every worker (a collective: every worker must call it); ``value`` alone."""
        if self.workers == 1:
            return value
        return self._total(value if self.chief else 0)

    def _total(self, local: int) -> int:
        import tensorflow as tf

        if self._sum is None:
            # One traced all-reduce per setup: run eagerly, a collective strategy warns of its overhead and
            # builds the reduction again at every call.
            def total(value):
                return self.strategy.reduce("sum", self.strategy.run(lambda: tf.identity(value)), axis=None)

            self._sum = tf.function(total, input_signature=[tf.TensorSpec((), tf.int64)])
        # Summed over replicas: each worker's devices all hold its value.
        return int(self._sum(tf.constant(local, tf.int64))) // (self.replicas // self.workers)


@dataclass(frozen=True)
class Cluster:
    """The parts of ``TF_CONFIG`` cnnkit uses."""

    tasks: int
    task_type: str
    task_index: int
    has_chief: bool = False

    @property
    def chief(self) -> bool:
        """The chief writes the run: task "chief" if the cluster has one, else worker 0."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0
                                             and not self.has_chief)

    @property
    def task(self) -> str:
        """This process's task in words: "worker-1"."""
        return f"{self.task_type}-{self.task_index}"


def helper_task(environ=os.environ) -> str:
    """This process's task when it is a worker that does not write the run ("worker-1"), else "".

    Needs no TensorFlow, so a resumed run can find this worker's own
    checkpoints before the cluster starts.
    """
    cluster = read_cluster(environ)
    return cluster.task if cluster and not cluster.chief else ""


def read_cluster(environ=os.environ) -> Cluster | None:
    """The multi-worker cluster ``TF_CONFIG`` describes, or None for a single process.

    Raises:
        CnnkitError: ``TF_CONFIG`` is not JSON, or names a task this process cannot be.
    """
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
        cluster = config.get("cluster") or {}
        task = config.get("task") or {}
        task_type, task_index = str(task.get("type", "")), int(task.get("index", 0))
        tasks = {name: list(addresses) for name, addresses in cluster.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise CnnkitError(f"TF_CONFIG is not valid: {error}; see README, 'Several machines'") from None
    unsupported = sorted(set(tasks) - {"chief", "worker"})
    if unsupported:
        raise CnnkitError(f"TF_CONFIG: task type(s) {', '.join(unsupported)} are not used by cnnkit; "
                          "list the machines as 'worker' (and optionally one 'chief')")
    count = sum(len(addresses) for addresses in tasks.values())
    if count <= 1:
        return None
    if task_type not in tasks or not 0 <= task_index < len(tasks[task_type]):
        raise CnnkitError(f"TF_CONFIG: this process's task {task_type!r} {task_index} is not in the cluster")
    return Cluster(count, task_type, task_index, "chief" in tasks)


def _multi_worker(cluster: Cluster, device: Device):
    import tensorflow as tf

    try:
        if device == Device.cpu:
            tf.config.set_visible_devices([], "GPU")
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:
        # TensorFlow configures the cluster when its runtime starts; it cannot join one later.
        raise CnnkitError(f"TF_CONFIG describes {cluster.tasks} workers, but TensorFlow was already running "
                          f"in this process ({error}); start training in a fresh process") from None


def setup_device(device: Device | str = Device.auto, deterministic: bool = False, seed: int = 0) -> DeviceSetup:
    """Pick CPU, GPU(s) or a cluster of workers (``TF_CONFIG``) for training.

    Call it before anything else starts TensorFlow's runtime: a multi-worker
    strategy must be created first.

    Raises:
        CnnkitError: ``--device gpu`` with no GPU visible; a bad ``TF_CONFIG``.
    """
    import keras
    import tensorflow as tf

    device = Device.parse(device, "--device")
    cluster = read_cluster()
    strategy = _multi_worker(cluster, device) if cluster else None
    gpus = tf.config.list_logical_devices("GPU")
    if device == Device.gpu and not gpus:
        raise CnnkitError("--device gpu: no GPU visible to TensorFlow (see `cnnkit info`)")
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    policy = "mixed_float16" if gpus else "float32"
    compute = f"{len(gpus)} GPU(s), mixed precision" if gpus else "CPU"
    if cluster:
        role = "chief, writes the run" if cluster.chief else "writes no run"
        return DeviceSetup(strategy, f"{cluster.tasks} workers ({cluster.task}: {compute}, {role})", policy,
                           cluster.tasks, cluster.task, cluster.chief)
    if device == Device.cpu and gpus:
        return DeviceSetup(tf.distribute.OneDeviceStrategy("/cpu:0"), "CPU (GPUs present but not used)")
    if not gpus:
        return DeviceSetup(tf.distribute.get_strategy(), "CPU")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.OneDeviceStrategy(gpus[0].name)
    return DeviceSetup(strategy, compute, policy)


def device_report(environ=os.environ) -> dict:
    """What ``cnnkit info`` shows: the GPUs TensorFlow sees, its CUDA build, and what training would use.

    Starts no cluster: safe to call with ``TF_CONFIG`` set.
    """
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capability = details.get("compute_capability")
        gpus.append({"device": gpu.name, "name": details.get("device_name", "GPU"),
                     "compute_capability": ".".join(map(str, capability)) if capability else None})
    build = tf.sysconfig.get_build_info()
    cuda = bool(build.get("is_cuda_build"))
    if gpus:
        names = ", ".join(sorted({g["name"] for g in gpus}))
        would_use = (f"{len(gpus)} GPU(s) ({names}), mixed precision float16 with a float32 classifier"
                     + (", mirrored" if len(gpus) > 1 else ""))
    else:
        would_use = "CPU (float32)"
    notes = []
    if not gpus and os.path.exists("/dev/nvidiactl"):
        notes.append("an NVIDIA driver is present but TensorFlow sees no GPU: "
                     + ("this TensorFlow has no CUDA support; pip install 'cnnkit[gpu]'" if not cuda else
                        "install its CUDA libraries (pip install 'cnnkit[gpu]') and check `nvidia-smi`"))
    try:
        cluster = read_cluster(environ)
    except CnnkitError as error:
        cluster = None
        notes.append(str(error))
    if cluster:
        notes.append(f"TF_CONFIG: this is {cluster.task} of {cluster.tasks} workers"
                     + (" (the chief, writes the run)" if cluster.chief else "")
                     + "; finetune and train run across them")
    return {"gpus": gpus, "gpu": bool(gpus), "would_use": would_use,
            "cuda_build": {"cuda": cuda, "cuda_version": build.get("cuda_version"),
                           "cudnn_version": build.get("cudnn_version")} if cuda else {"cuda": False},
            "workers": cluster.tasks if cluster else 1, "notes": notes}
