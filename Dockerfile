# Scoring image: the base install only (onnxruntime + Beam), no TensorFlow, and only the scoring side's code
# (xray_core, with the model-package contract, and batch_job); nothing of it imports export/ or train/.
#   docker build -t pneumonia-batch .
#   docker run --rm -v /data/xrays:/input:ro -v /data/scores:/output pneumonia-batch
#   docker run --rm -v ...:/input:ro -v ...:/output pneumonia-batch --input /input --output /output/2026-11-25
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 scorer
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY xray_core ./xray_core
COPY batch_job ./batch_job
COPY serving_models ./serving_models
# the base install: onnxruntime, Beam, pydicom and its decoder plugins for compressed DICOM (pylibjpeg, -libjpeg,
# -openjpeg, -rle, pyjpegls: manylinux wheels with their codecs inside, nothing from apt)
RUN pip install .

USER scorer
VOLUME ["/input", "/output"]
# The shipped model when no --model is given (docker run -e PNEUMONIA_MODEL=... or --model ... to change it).
ENV PNEUMONIA_MODEL=/app/serving_models/pneumonia
# exec form: the job is PID 1, so `docker stop`'s SIGTERM reaches Python (whose handler removes the temporary
# folder and exits 143) and the container exits with the job's exit code.
ENTRYPOINT ["python", "-m", "batch_job"]
CMD ["--input", "/input", "--output", "/output/scores"]
