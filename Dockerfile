# syntax=docker/dockerfile:1.7
# One image for every Jobtree service. The command picks the service:
#   docker run IMAGE admission --nats-url nats://nats:4222     (or: IMAGE jobtree-admission ...)
# The Helm chart and the Kustomize bases set `command: [jobtree-<service>]` directly.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip wheel --wheel-dir /wheels '.[server]'

FROM ${PYTHON_IMAGE}
ARG APP_UID=65532
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JOBTREE_HTTP_HOST=0.0.0.0
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels 'jobtree[server]' \
    && groupadd --system --gid "${APP_UID}" jobtree \
    && useradd --system --uid "${APP_UID}" --gid jobtree --home-dir /home/jobtree --create-home \
       --shell /usr/sbin/nologin jobtree
COPY --chmod=0755 <<'SCRIPT' /usr/local/bin/jobtree-entrypoint
#!/bin/sh
# Select the service by its short name or run a command as given (jobtree-binder, sh, ...).
set -e
case "${1:-}" in
  admission|packer|forecast|resolver|binder|local)
    service=$1
    shift
    exec "jobtree-${service}" "$@"
    ;;
  "")
    echo "usage: IMAGE admission|packer|forecast|resolver|binder [flags]" >&2
    echo "       IMAGE jobtree-<service> [flags]" >&2
    exit 64
    ;;
  *)
    exec "$@"
    ;;
esac
SCRIPT
USER ${APP_UID}:${APP_UID}
WORKDIR /home/jobtree
# health, readiness and metrics (JOBTREE_HTTP_PORT), admission webhooks (JOBTREE_WEBHOOK_PORT)
EXPOSE 8080 9443
ENTRYPOINT ["/usr/local/bin/jobtree-entrypoint"]
CMD ["admission"]
