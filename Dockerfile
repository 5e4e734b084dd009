# Canal: one image for the controller, the xDS/DNS server and the node agent (the command picks the role).
# Built from the repository root: docker build -t canal .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY canal ./canal
COPY xds ./xds
COPY dns ./dns
COPY node-agent ./node-agent
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
# nftables (with libnftables1): the node agent's default redirect backend, in-process or through the nft binary.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
# The controller and servers run unprivileged; the node agent's pod spec adds NET_ADMIN where it needs it.
RUN useradd --system --uid 10001 --no-create-home canal
USER 10001
ENTRYPOINT ["canal"]
CMD ["--help"]
