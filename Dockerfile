# zmq-exporter: ZeroMQ socket-monitor events as Prometheus metrics. See deploy/README.md.
#   docker build -t zmq-exporter .
#   docker run --read-only -p 19555:19555 zmq-exporter        # the default config (README's)
#   docker run --read-only -p 19555:19555 \
#     -v "$PWD/config.yml:/etc/zmq-exporter/config.yml:ro" zmq-exporter   # your own
# podman: `podman build --format docker` (the OCI format drops HEALTHCHECK).
# PYTHON_IMAGE: any Debian-based image with Python 3.11 as `python` and the venv module;
# tests/deploy/test_deploy_docker.py passes one built with debootstrap where no registry is
# reachable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: dependencies and the package into a venv (pyzmq ships libzmq in its wheel,
# so no compiler is needed; the venv is the only thing the runtime stage takes). Without a
# compiler, library mode's compiled message counter (exporter/messages/_counting.c, an
# optional extension) is not built: the daemon never counts messages itself.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md LICENSE ./
COPY exporter ./exporter
# Non-editable install; bytecode is compiled here, so nothing is written at run time.
# pip and setuptools leave the venv once it is installed: nothing runs them at run time.
# The otlp extra: the image can push over OTLP (grpcio, urllib3, opentelemetry-proto).
RUN /opt/venv/bin/pip install --no-cache-dir --no-compile ".[otlp]" \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# ---- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="zmq-exporter" \
      org.opencontainers.image.description="ZeroMQ socket-monitor events as Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 zmq-exporter \
    && useradd --system --uid 10001 --gid zmq-exporter --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin zmq-exporter
COPY --from=builder /opt/venv /opt/venv
# Default config (the demo sockets); mount your own over it, read-only.
COPY config/zmq-exporter.yml /etc/zmq-exporter/config.yml
# Numeric uid so Kubernetes' runAsNonRoot can verify it. Nothing is written to the root
# filesystem: run with --read-only / readOnlyRootFilesystem (ipc:// endpoints need a
# writable volume of their own).
USER 10001:10001
EXPOSE 19555
# Python, not curl (the slim image has no curl). It reads the daemon's arguments from
# /proc/1/cmdline and checks every --web.listen-address, or with --web.systemd-socket every
# socket passed, with TLS from --web.config.file; with basic auth on, 401 counts as
# answering (deploy/healthcheck.py).
COPY deploy/healthcheck.py /usr/local/lib/zmq-exporter/healthcheck.py
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/lib/zmq-exporter/healthcheck.py"]
# Exec form: the daemon is PID 1 and gets SIGTERM itself (clean close, exit 0).
ENTRYPOINT ["zmq-exporter"]
CMD ["--config.file=/etc/zmq-exporter/config.yml", "--web.listen-address=:19555"]
