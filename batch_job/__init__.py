"""The batch scoring stage (``python -m batch_job``). CODE_SHA256: the job's code as this process first imported it,
which a Dask worker must share with the driver (dask_probe.py)."""
import hashlib
import os


def _code_sha256() -> str:
    """sha256 over the .py files of batch_job and xray_core (each one's name and content, line endings as LF), as
    they are when this process first imports the job: a long-lived worker keeps the code it loaded, whatever an
    upgrade later writes to disk (review)."""
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ("batch_job", "xray_core"):
        folder = os.path.join(root, package)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if name.endswith(".py"):
                digest.update(f"{package}/{name}\0".encode())
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(f.read().replace(b"\r\n", b"\n"))
    return digest.hexdigest()


CODE_SHA256 = _code_sha256()
