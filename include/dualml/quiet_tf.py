"""Import TensorFlow without the GPU-probe noise a CPU-only machine prints.

On a machine without an NVIDIA driver (a laptop, a Composer worker, the local cloud's jobs),
``import tensorflow`` and the first device lookup write lines like "Could not find cuda drivers on
your machine" and "E0000 ... failed call to cuInit" straight to file descriptor 2, before TensorFlow's
own logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them and they land in every task log
as errors nobody can act on. :func:`import_tensorflow` imports TensorFlow and finds its devices with
fd 2 passed through a filter that drops exactly those lines and forwards every other byte. Where a
driver is present nothing is filtered: a CUDA message there may matter.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

# Lines TensorFlow's CUDA probe prints when there is no GPU driver; anything else goes through.
NOISE = re.compile(
    rb"cudart_stub\.cc:\d+\] Could not find cuda drivers"
    rb"|cuda_platform\.cc:\d+\] failed call to cuInit"
    rb"|cuda_executor\.cc:\d+\] .*(kernel driver does not appear|could not open file to read NUMA)"
    rb"|^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
)


def has_gpu_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia/version")


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[bytes] = NOISE):
    """Within the block, lines written to fd 2 (by C++ or Python) that match ``noise`` are dropped;
    the others reach the original fd 2 unchanged, in order."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not noise.search(line):
                    os.write(original, line)

    pump = threading.Thread(target=forward, name="filtered-stderr", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the pump reads EOF
        pump.join(timeout=10)
        os.close(original)


def import_tensorflow():
    """``import tensorflow`` (and its device discovery), quietly on a machine without a GPU driver."""
    if "tensorflow" in sys.modules or has_gpu_driver():
        import tensorflow as tf

        return tf
    with filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    return tf
