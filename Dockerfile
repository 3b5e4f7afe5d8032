# sluiceway: the routing proxy as a container image.
#
#   docker build -t sluiceway .
#   docker run -p 8000:8000 -v ./config.toml:/etc/sluiceway/config.toml:ro sluiceway
#
# The config's [server] host must be "0.0.0.0" (or "::") to be reachable from outside the
# container; every key can be overridden by SLUICEWAY_<SECTION>__<KEY> env vars.
# See docs/deploy.md. No `# syntax=` line: BuildKit would have to pull a frontend image.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
# the venv is built here, with compilers' leftovers and pip's cache, and only the venv
# moves on to the runtime stage (same base image, so the same interpreter path); its
# dependencies are the versions in constraints.txt, the ones the suite passed on
RUN python3 -m venv /opt/sluiceway
COPY pyproject.toml README.md constraints.txt ./
COPY proxy ./proxy
COPY backends ./backends
COPY policies ./policies
COPY emulator ./emulator
COPY loadgen ./loadgen
COPY cluster ./cluster
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/sluiceway/bin/pip wheel -c constraints.txt --wheel-dir /wheels . \
    && /opt/sluiceway/bin/pip install --no-index --find-links /wheels sluiceway \
    && find /opt/sluiceway -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
# a numeric user, so that runAsNonRoot can check it without the image's /etc/passwd
RUN groupadd --system --gid 10001 sluiceway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin sluiceway \
    && mkdir -p /etc/sluiceway
COPY --from=build /opt/sluiceway /opt/sluiceway
ENV PATH=/opt/sluiceway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# 8000: the data plane (OpenAI-compatible API, /health, /ready, /metrics);
# 9000: the admin plane, when [admin] is configured: keep it private
EXPOSE 8000 9000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sluiceway", "health", "--config", "/etc/sluiceway/config.toml"]
# exec form: sluiceway is PID 1 and gets SIGTERM itself: it stops accepting, lets the
# streams in flight finish (server.shutdown_grace_s), then exits 0. Give the runtime a
# stop timeout longer than that grace (docker stop -t / terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sluiceway"]
CMD ["serve", "--config", "/etc/sluiceway/config.toml"]
