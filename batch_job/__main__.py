"""python -m batch_job: score X-ray folders with a published ONNX model (Apache Beam)."""
import os
import sys

from batch_job.pipeline import main

if __name__ == "__main__":
    code = main()
    # Every output is written, closed and renamed by now. Skip the interpreter's teardown of
    # Beam, gRPC and onnxruntime objects: it took ~1 s per job (measured), longer than scoring
    # a thousand images.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
