"""Benchmark: what averaging with the mirror image (`train --flip`) is worth for one trained network run.

The same weights (the run's ``model.keras``) classify the test images four
ways: as given, mirrored only, probabilities of both views averaged, and
logits of both views averaged. The last is what a ``--flip`` run predicts
with (``cnnkit.kinds.network.inference_network`` averages the pooled
features before the linear classifier), so it equals `cnnkit evaluate`.

    python bench/mirror_average.py RUN DATA [--split test] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from cnnkit.data import load_dataset
    from cnnkit.data.images import load_image
    from cnnkit.kinds.network import load_network
    from cnnkit.runs import load_run

    run = load_run(args.run)
    samples = load_dataset(args.data).splits[args.split]
    images = np.stack([load_image(s.path, run.image_size) for s in samples])
    labels = np.array([s.label for s in samples])
    model = load_network(run.file("model.keras"))  # the network alone: one view
    plain = model.predict(images, batch_size=500, verbose=0)
    mirror = model.predict(images[:, :, ::-1], batch_size=500, verbose=0)
    logits = np.log(plain + 1e-12) + np.log(mirror + 1e-12)  # softmax logits up to a per-image constant
    result = {name: float((scores.argmax(1) == labels).mean()) for name, scores in
              (("as given", plain), ("mirrored", mirror), ("probabilities averaged", plain + mirror),
               ("logits averaged (--flip)", logits))}
    result.update(run=str(args.run), images=len(labels), run_flip=run.model.flip)
    for name, value in result.items():
        print(f"{name:26s} {value if not isinstance(value, float) else f'{value:.4f}'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
