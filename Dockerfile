# dicom-node image. CUDA build of torch by default; CPU-only with --build-arg TORCH_VARIANT=cpu.
FROM python:3.11-slim-bookworm

ARG TORCH_VARIANT=cuda
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 10001 dicomnode

WORKDIR /opt/dicom-node
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY pipeline ./pipeline

RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
      pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    else \
      pip install torch==2.13.0; \
    fi \
 && pip install .

COPY config.yaml /etc/dicom-node/config.yaml

USER dicomnode
VOLUME ["/var/lib/dicom-node", "/etc/dicom-node"]
EXPOSE 11112

ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "/etc/dicom-node/config.yaml"]
