# Prometheus from Debian's package on the same base as the service (no image registry needed).
# `docker build -f deploy/docker/prometheus.Dockerfile -t kovae-prometheus deploy`
FROM python:3.11-slim
# every image and stage this project builds carries it: .ci/run removes their untagged predecessors
LABEL org.opencontainers.image.vendor="kovae-forecast"
# Debian's stable package; its version is the one bookworm ships.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/*
COPY prometheus/prometheus.yml prometheus/alerts.yml /etc/prometheus/
USER 65534
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/tmp/prometheus", "--web.listen-address=0.0.0.0:9090"]
