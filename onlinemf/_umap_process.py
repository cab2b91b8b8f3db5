"""UMAP in a helper process, so that it runs beside Leiden instead of after it.

umappp (scranpy's compiled UMAP) and igraph's Leiden both hold the GIL for their whole run (a Python thread
spinning beside umappp got 0.6 % of its solo count), so two threads cannot overlap them; two processes can.
The helper is started when a run begins, so its imports (~0.7 s) overlap the fit, and then waits on its
standard input for one matrix. It gets the rows' bytes and runs the same :func:`postprocess.run_umap`, so its
layout equals an in-process one to the bit.

Protocol, over pipes: the parent writes one JSON line (shape, dtype, run_umap's options) and the matrix's raw
bytes; the helper answers one JSON line (shape and seconds, or an error) and the coordinates' raw bytes. The
helper's standard output carries only this protocol (anything a library prints goes to its standard error,
which is kept in a temporary file for error messages). End of input without a request: the helper exits.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Seconds a helper that has answered gets to exit before it is killed.
EXIT_WAIT_S = 5.0


class UMAPProcessError(RuntimeError):
    """The helper process failed or died; the caller runs UMAP in-process instead."""


class UMAPProcess:
    """One UMAP layout in a helper process: :meth:`start`, :meth:`submit`, then :meth:`result`; :meth:`close`
    (or the ``with`` block) ends the helper in every case."""

    def __init__(self, proc: subprocess.Popen, stderr) -> None:
        self._proc = proc
        self._stderr = stderr
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None
        #: The helper's seconds for the layout and its peak resident memory (MB; None where unknown).
        self.seconds: float | None = None
        self.peak_mb: float | None = None

    @classmethod
    def start(cls) -> UMAPProcess | None:
        """Start the helper (this interpreter, running :func:`main`); None when it cannot be started."""
        if not sys.executable or getattr(sys, "frozen", False):  # a frozen app's executable is not a Python
            return None
        # The helper imports this very onlinemf: its folder goes first on the helper's path unless it is there
        # already (an installed package's site-packages is; a checkout on this process's sys.path may not be).
        root = str(Path(__file__).resolve().parents[1])
        code = (f"import sys; root = {root!r}; root in sys.path or sys.path.insert(0, root); "
                "from onlinemf._umap_process import main; sys.exit(main())")
        stderr = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=stderr)
        except OSError as exc:
            stderr.close()
            logger.info("UMAP helper process not started (%s); UMAP runs after Leiden", exc)
            return None
        return cls(proc, stderr)

    def submit(self, X: np.ndarray, **options) -> None:
        """Send X and run_umap's keyword options (JSON-serialisable); returns at once (a thread writes)."""
        X = np.ascontiguousarray(X)
        header = json.dumps({"shape": list(X.shape), "dtype": X.dtype.str, "options": options}).encode() + b"\n"

        def write() -> None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(header)
                self._proc.stdin.write(X.view(np.uint8).data)
                self._proc.stdin.close()
            except BaseException as exc:  # noqa: BLE001 - reported by result()
                self._write_error = exc

        self._writer = threading.Thread(target=write, name="onlinemf-umap-submit", daemon=True)
        self._writer.start()

    def result(self) -> np.ndarray:
        """The coordinates (sets :attr:`seconds` and :attr:`peak_mb`); UMAPProcessError when the helper failed."""
        if self._writer is None:
            raise UMAPProcessError("no matrix was submitted")
        self._writer.join()
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if self._write_error is not None or not line:
            raise UMAPProcessError(self._failure(self._write_error))
        reply = json.loads(line)
        if "error" in reply:
            raise UMAPProcessError(reply["error"])
        shape = tuple(reply["shape"])
        data = _read_exact(self._proc.stdout, int(np.prod(shape)) * np.dtype(reply["dtype"]).itemsize)
        if data is None:
            raise UMAPProcessError(self._failure(None))
        self.seconds, self.peak_mb = float(reply["seconds"]), reply.get("peak_mb")
        return np.frombuffer(data, dtype=reply["dtype"]).reshape(shape).copy()

    def _failure(self, exc: BaseException | None) -> str:
        try:
            code = self._proc.wait(timeout=1.0)  # its output ended: it has exited, or is about to
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        last = lines[-1] if lines else (str(exc) if exc else "no output")
        return f"UMAP helper process {'exited with ' + str(code) if code is not None else 'stopped answering'}: {last}"

    def close(self) -> None:
        """End the helper: at once if it was given nothing (the run failed or was interrupted) or its layout was
        not read; a helper that answered has exited by itself."""
        proc = self._proc
        if self._writer is None or self.seconds is None:
            proc.kill()  # idle or busy with a layout nobody will read: nothing of value is lost
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._stderr.close()

    def __enter__(self) -> UMAPProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_exact(stream, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _peak_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _warm_imports() -> None:
    # What run_umap will import, loaded while the parent is still fitting.
    import importlib

    for name in ("scranpy", "knncolle", "faiss"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def main() -> int:
    """The helper's loop: one request from standard input, one answer on the original standard output."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the protocol
    from onlinemf import postprocess

    _warm_imports()
    stdin = sys.stdin.buffer
    line = stdin.readline()
    if not line:
        return 0
    request = json.loads(line)
    shape = tuple(request["shape"])
    data = _read_exact(stdin, int(np.prod(shape)) * np.dtype(request["dtype"]).itemsize)
    if data is None:
        return 1
    X = np.frombuffer(data, dtype=request["dtype"]).reshape(shape)
    t = time.perf_counter()
    try:
        coords = np.ascontiguousarray(postprocess.run_umap(X, **request["options"]))
    except Exception as exc:  # noqa: BLE001 - the parent reruns in-process and raises there
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
        out.flush()
        return 1
    reply = {"shape": list(coords.shape), "dtype": coords.dtype.str, "seconds": time.perf_counter() - t,
             "peak_mb": _peak_mb()}
    out.write(json.dumps(reply).encode() + b"\n")
    out.write(coords.view(np.uint8).data)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
