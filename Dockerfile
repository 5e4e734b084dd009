# syntax=docker/dockerfile:1
# Canal: one image for the controller, the node agent and the chart's uninstall cleanup; the command picks the role
# (`canal controller`, `canal node-agent`, ...). Built from the repository root: docker build -t canal .
#
# The base is pinned to a patch release; release builds should also pin its digest, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest of `docker buildx imagetools inspect`>
# (not committed here: the digest must be read from the registry, and this tree is built where it can be).
# Debian 12 (bookworm): its nftables 1.0.6 is the release the node agent is developed and tested against.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: Canal and its dependencies into a virtual environment (every dependency ships wheels for CPython
# 3.11 on x86-64 and arm64, so no compiler is needed here either)
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY canal ./canal
COPY xds ./xds
COPY dns ./dns
COPY node-agent ./node-agent
# --without-pip: the environment gets Canal and its dependencies only; the base image's pip installs into it.
RUN python -m venv --without-pip /opt/canal \
    && python -m pip --python /opt/canal/bin/python install --no-cache-dir /src

# ---- runtime
FROM ${PYTHON_IMAGE}
# nftables: the nft binary and libnftables1, whose libnftables.so.1 the node agent loads in-process (ctypes); the
# binary serves --nft-binary and the IPVS backend's mark table. The upstream version is pinned, the Debian
# revision is not, so security updates of bookworm still apply. pip, setuptools and wheel are removed: nothing
# installs packages at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'nftables=1.0.6-*' 'libnftables1=1.0.6-*' \
    && rm -rf /var/lib/apt/lists/* \
    && python -m pip uninstall -y --no-cache-dir pip setuptools wheel \
    && groupadd --system --gid 10001 canal \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin canal
COPY --from=build /opt/canal /opt/canal
ENV PATH=/opt/canal/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="canal" \
      org.opencontainers.image.description="Canal: east-west gateway manager for Kubernetes + Istio" \
      org.opencontainers.image.licenses="Apache-2.0"
# Unprivileged by default (the controller, the servers, the cleanup Job); the node agent's pod spec runs it as
# root with every capability dropped but NET_ADMIN (charts/canal/templates/_helpers.tpl explains why).
USER 10001:10001
ENTRYPOINT ["canal"]
CMD ["--help"]
