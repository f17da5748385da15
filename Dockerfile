# kovae-forecast, the service: slim, no torch, non-root, HEALTHCHECK on whatever KOVAE_PORT is.
# The training image is Dockerfile.train. Base: python:3.11-slim (deploy/docker/base-image.sh builds a stand-in
# where no registry is reachable).

FROM python:3.11-slim AS build
# every image and stage this project builds carries it: .ci/run removes their untagged predecessors
LABEL org.opencontainers.image.vendor="kovae-forecast"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY modelcard ./modelcard
COPY optimizer ./optimizer
COPY export ./export
COPY plant ./plant
COPY training ./training
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim AS serve
# every image and stage this project builds carries it: .ci/run removes their untagged predecessors
LABEL org.opencontainers.image.vendor="kovae-forecast"
RUN useradd --create-home --uid 10001 kovae
WORKDIR /app
COPY --from=build /install /usr/local
COPY --chown=10001:10001 models ./models
ENV KOVAE_HOST=0.0.0.0 \
    KOVAE_PORT=8000 \
    KOVAE_MODEL_STORE=/app/models \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KOVAE_PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "service"]
