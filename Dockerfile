# One image for every role: the coordinator, join-swarm workers and the admin CLI.
# CPU by default; for GPU workers build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and exactly, from the chosen index: a looser pin pulls several GB of CUDA packages.
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY common common
COPY swarm swarm
COPY fusion fusion
COPY lm lm
COPY coordinator coordinator
COPY worker worker
RUN pip install . && useradd --create-home --uid 1000 coldswarm && mkdir -p /data /work && chown coldswarm /data /work

USER coldswarm
WORKDIR /home/coldswarm
