# cnnkit on CPU. Build: docker build -t cnnkit .
# Run:   docker run --rm -v "$PWD:/data" cnnkit predict /data/photo.jpg
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CNNKIT_HOME=/opt/cnnkit-cache \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/cnnkit
COPY pyproject.toml README.md ./
COPY cnnkit ./cnnkit
RUN pip install . \
    # Convert the offline EfficientNet-Lite weights once, at build time.
    && cnnkit backbones --prepare > /dev/null \
    && chmod -R a+rX "$CNNKIT_HOME"

WORKDIR /data
ENTRYPOINT ["cnnkit"]
CMD ["--help"]
