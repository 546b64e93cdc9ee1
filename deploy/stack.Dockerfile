# The team stack's image (compose.yaml): the project installed by the same script CI runs, with
# PostgreSQL's client (pg_isready for health checks). One image runs the S3 emulator, the MLflow
# server, the Prefect server and worker, the stack's setup jobs and the serving app; PostgreSQL
# runs the stock postgres:15 image. Build from the repository root: docker compose build
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
      postgresql-client && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VENV=/opt/venv
WORKDIR /srv/barkgpt
# Dependencies first (a code change does not reinstall them), then the code.
COPY pyproject.toml README.md constraints.txt requirements.lock ./
COPY scripts/ scripts/
COPY barkgpt/ barkgpt/
COPY tasks/ tasks/
COPY flows/ flows/
# llama.cpp for a generic x86-64 host: not the build machine's CPU
ENV LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
RUN scripts/install.sh all
ENV PATH=/opt/venv/bin:$PATH
# The worker and the serving app mount the project here (compose.yaml): flow runs work in it.
COPY . .
