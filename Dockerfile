# Herald: one image for the gateway and the operator.
#
#   docker build -t herald:0.1.0 .
#   gateway:   docker run -p 8080:8080 herald:0.1.0                  (runs `herald serve`)
#   operator:  docker run herald:0.1.0 herald-operator run --namespace herald
#
# The Helm chart (charts/herald) sets the command of each container itself.
# Two stages: the first installs Herald and its dependencies into a virtualenv
# (every dependency ships wheels for CPython 3.11 on amd64 and arm64, so no
# compiler is needed); the second copies only that virtualenv onto a clean slim
# base. The final image has no pip cache, no build tools and no source tree, and
# runs as an unprivileged user with a read-only root filesystem in mind: nothing
# is written outside /tmp. No HEALTHCHECK: Kubernetes probes /readyz and /healthz.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/herald
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY operator ./operator
# A regular (not editable) install: the venv holds its own copy of Herald, so
# the final stage needs no /src. Bytecode is compiled here because the running
# image cannot write it; `-I` keeps /src/operator from shadowing the standard
# library's `operator` module. pip and setuptools then leave the venv.
RUN /opt/herald/bin/pip install --upgrade pip \
    && /opt/herald/bin/pip install '.[operator]' \
    && /opt/herald/bin/python -I -m compileall -q /opt/herald/lib \
    && /opt/herald/bin/pip uninstall -y pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="Herald WebSocket gateway and operator" \
      org.opencontainers.image.licenses="Apache-2.0"
# The same numeric ids as the chart's podSecurityContext (runAsUser 10001).
RUN groupadd --system --gid 10001 herald \
    && useradd --system --uid 10001 --gid herald --home-dir /tmp --shell /usr/sbin/nologin herald
# The base image's own pip is not needed at run time.
RUN python -m pip uninstall -y pip setuptools wheel
COPY --from=build /opt/herald /opt/herald
ENV PATH=/opt/herald/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HERALD_HOST=0.0.0.0 \
    HERALD_PORT=8080
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
CMD ["herald", "serve"]
