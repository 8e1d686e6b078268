"""python -m batch_job: score X-ray folders with a published ONNX model (Apache Beam)."""
import logging
import os
import sys

from batch_job.report_worker import Reporter

if __name__ == "__main__":
    # Importing Beam logs a warning on the root logger about optional GCP client libraries
    # (apitools/BigQuery) that this job never uses; the job logs through its own logger.
    logging.getLogger().setLevel(logging.ERROR)
    reporter = Reporter()  # first, so its imports overlap Beam's (batch_job/report_worker.py)
    from batch_job.pipeline import main

    code = main(reporter=reporter)
    reporter.close()
    # Every output is written, closed and renamed by now. Skip the interpreter's teardown of
    # Beam, gRPC and onnxruntime objects: it took ~1 s per job (measured), longer than scoring
    # a thousand images.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
