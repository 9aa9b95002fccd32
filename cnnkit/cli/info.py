"""`cnnkit info`: versions, devices, cache directory, weights on disk."""

from __future__ import annotations

import platform

from rich.markup import escape

from cnnkit.cli._common import JsonOption, console, print_json, quiet_output, user_errors


def _version(package: str) -> str:
    from importlib import metadata  # here, not at import: `cnnkit --help` stays light

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect_info() -> dict:
    """Everything `cnnkit info` reports, as plain data."""
    quiet_output()
    import tensorflow as tf

    from cnnkit import __version__
    from cnnkit.backbones import list_backbones
    from cnnkit.paths import cache_dir
    from cnnkit.training.device import device_report

    return {
        "cnnkit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "tensorflow": tf.__version__,
            **{p: _version(p) for p in ("keras", "numpy", "pillow", "scikit-learn", "typer", "rich")},
        },
        "devices": [d.name for d in tf.config.list_physical_devices()],
        **device_report(),
        "cache_dir": str(cache_dir()),
        "weights_on_disk": [b.name for b in list_backbones() if b.weights_present()],
        "engines": engine_report(),
    }


def engine_report() -> dict:
    """The usable engines, what each missing one needs, and what ``--engine auto`` runs the default backbone on."""
    from cnnkit.backbones.registry import DEFAULT_BACKBONE
    from cnnkit.engines import NAMES, PACKAGES, available_engines, missing_packages
    from cnnkit.features import FeatureConfig, FeatureExtractor

    runner = FeatureExtractor(FeatureConfig(DEFAULT_BACKBONE)).runner  # measured once per machine, remembered
    return {"usable": [str(e) for e in available_engines()],
            "missing": {str(e): missing_packages(e) for e in PACKAGES if missing_packages(e)},
            "auto": {"backbone": DEFAULT_BACKBONE, "engine": str(runner.engine), "name": NAMES[runner.engine],
                     "precision": str(runner.precision)}}


def info(json_output: JsonOption = False) -> None:
    """Versions, GPUs and what training would use, cache directory, and which backbones have weights on disk."""
    with user_errors():
        data = collect_info()
    if json_output:
        print_json(data)
        return
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("cnnkit", data["cnnkit"])
    table.add_row("python", f"{data['python']} ({data['platform']})")
    for package, version in data["versions"].items():
        table.add_row(package, version)
    table.add_row("devices", ", ".join(data["devices"]))
    for gpu in data["gpus"]:
        capability = f", compute capability {gpu['compute_capability']}" if gpu["compute_capability"] else ""
        table.add_row("gpu", escape(f"{gpu['device']}: {gpu['name']}{capability}"))
    build = data["cuda_build"]
    table.add_row("tensorflow build", f"CUDA {build['cuda_version']}, cuDNN {build['cudnn_version']}"
                  if build["cuda"] else "CPU only (no CUDA)")
    table.add_row("training uses", data["would_use"] + (f", {data['workers']} workers" if data["workers"] > 1 else ""))
    engines = data["engines"]
    table.add_row("engines", ", ".join(engines["usable"]) + "".join(
        f"; {name} needs {', '.join(packages)}" for name, packages in engines["missing"].items()))
    auto = engines["auto"]
    table.add_row("--engine auto", f"{auto['name']} ({auto['engine']}) in {auto['precision']} for {auto['backbone']}")
    table.add_row("cache dir", data["cache_dir"])
    table.add_row("weights on disk", ", ".join(data["weights_on_disk"]) or "none")
    console.print(table)
    for note in data["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


def register(app) -> None:
    app.command()(info)
