# The Ray worker image for the Helm chart (helm/ridgeline): Ray with Ridgeline installed.
#   docker build -t ghcr.io/ridgeline/ridgeline:0.1.0 .
# The CUDA build of torch comes from PyPI (the default wheels); NIXL's CUDA plugin comes with nixl-cu12.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libibverbs1 librdmacm1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ridgeline
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY kernels ./kernels
COPY services ./services
COPY control_plane ./control_plane
COPY observability ./observability
COPY benchmarks ./benchmarks
COPY models ./models
RUN pip install --no-cache-dir . "nixl-cu12==1.5.1" \
    && python -c "import engine, kernels, services, control_plane, observability, nixl"

ENV HF_HUB_OFFLINE=1 \
    RIDGELINE_MODEL=/opt/ridgeline/models/ridgeline-ref-target \
    PYTHONUNBUFFERED=1
USER ray
WORKDIR /home/ray
