# cnnkit in a container (README, "Docker").
#
#   docker build -t cnnkit .                                   # CPU
#   docker build -t cnnkit:gpu --build-arg BASE=tensorflow/tensorflow:2.21.0-gpu --build-arg TENSORFLOW= .
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/data" cnnkit auto /data/photos --out /data/runs/photos
#
# BASE: an image with Python >= 3.10 and pip as `python3`: the official
# Python image (default), or the official TensorFlow GPU image, which brings
# TensorFlow with CUDA and cuDNN (run it with `--gpus all`).
ARG BASE=python:3.11-slim
FROM ${BASE}

# The TensorFlow distribution to install: tensorflow-cpu (half the size of
# tensorflow; this image has no CUDA), or empty when BASE already has TensorFlow.
ARG TENSORFLOW=tensorflow-cpu

# No pip cache in the image; HOME for any --user uid (Keras and Matplotlib write
# their settings there); the converted weights live in CNNKIT_HOME.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CNNKIT_HOME=/opt/cnnkit-cache \
    HOME=/tmp

# Dependencies in a layer of their own: a change to cnnkit's code does not reinstall TensorFlow.
COPY pyproject.toml docker/requirements.py /tmp/cnnkit-build/
RUN python3 /tmp/cnnkit-build/requirements.py /tmp/cnnkit-build/pyproject.toml "$TENSORFLOW" > /tmp/requirements.txt \
    && python3 -m pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md /tmp/cnnkit-build/
COPY cnnkit /tmp/cnnkit-build/cnnkit
# --no-deps: everything is in, and with TENSORFLOW=tensorflow-cpu pip would add `tensorflow` too.
# The offline EfficientNet-Lite weights are converted once, here; the cache folder
# stays writable (sticky, like /tmp) for the feature cache of whoever runs the image.
# Whatever this root build wrote under HOME (/tmp) goes, or other uids could not write there.
RUN python3 -m pip install --no-deps /tmp/cnnkit-build \
    && cnnkit backbones --prepare > /dev/null \
    && chmod -R a+rX "$CNNKIT_HOME" && chmod 1777 "$CNNKIT_HOME" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin cnnkit \
    && rm -rf /tmp/cnnkit-build /tmp/.cache /tmp/.config /tmp/.keras

USER 10001:10001
WORKDIR /data
ENTRYPOINT ["cnnkit"]
CMD ["--help"]
