# dicom-node: the node as a container image.
#   docker build -t dicom-node .                              (CUDA build of torch, default)
#   docker build -t dicom-node --build-arg TORCH_VARIANT=cpu .  (CPU only, smaller)
FROM python:3.11-slim-bookworm

ARG TORCH_VARIANT=cuda
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/dicom-node
COPY pyproject.toml README.md ./
# the product only: demo/ (synthetic phantom model and studies) stays out of the image
COPY dicom_node ./dicom_node
COPY pipeline ./pipeline

# torch is pinned and installed first: the CPU variant from PyTorch's CPU index, the
# default from PyPI (which carries the CUDA libraries).
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
      pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    else \
      pip install --no-cache-dir torch==2.13.0; \
    fi \
 && pip install --no-cache-dir . \
 && useradd --create-home --uid 10001 --user-group dicomnode \
 && mkdir -p /var/lib/dicom-node /weights /etc/dicom-node \
 && chown -R 10001:10001 /var/lib/dicom-node /weights

COPY deploy/config.docker.yaml /etc/dicom-node/config.yaml

USER 10001:10001
# data (spool, state, SEGs), model weights, configuration
VOLUME ["/var/lib/dicom-node", "/weights", "/etc/dicom-node"]
EXPOSE 11112 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "/etc/dicom-node/config.yaml"]
