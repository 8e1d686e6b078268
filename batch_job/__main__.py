"""python -m batch_job (or pneumonia-batch): score X-ray folders with a published ONNX model (Apache Beam)."""
import logging
import os
import signal
import sys
import time

from batch_job.interrupts import GATE
from batch_job.report_worker import Reporter


def main() -> int:
    started = time.perf_counter()
    signal.signal(signal.SIGINT, GATE.handler)  # batch_job/interrupts.py
    reporter = Reporter()  # first, so its imports overlap Beam's (batch_job/report_worker.py)
    root = logging.getLogger()
    level = root.level
    # Importing Beam logs a warning on the root logger about optional GCP client libraries
    # (apitools/BigQuery) that this job never uses.
    root.setLevel(logging.ERROR)
    from batch_job.pipeline import main as job_main

    root.setLevel(level)
    code = job_main(reporter=reporter, started=started)
    reporter.close()
    # Every output is written, closed and renamed by now. Skip the interpreter's teardown of
    # Beam, gRPC and onnxruntime objects: it took ~1 s per job (measured), longer than scoring
    # a thousand images.
    for stream in (sys.stdout, sys.stderr, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
