"""dualml.quiet_tf: TensorFlow's CUDA-probe lines on a machine without a GPU driver stay out of task
logs; every other line written to stderr meanwhile still gets through, in order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INCLUDE = Path(__file__).resolve().parents[1] / "include"

NOISY = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1795441562.614126   28645 cudart_stub.cc:31] Could not find cuda drivers on your machine,"
    b" GPU will not be used.\n"
    b"E0000 00:00:1795441580.955210   28645 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(INCLUDE), **env}
    full.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, timeout=300)


def test_filter_drops_the_probe_lines_and_forwards_the_rest_in_order():
    code = (
        "import os, sys\n"
        "from dualml.quiet_tf import filtered_stderr\n"
        "os.write(2, b'before\\n')\n"
        "with filtered_stderr():\n"
        f"    os.write(2, b'one\\n' + {NOISY!r} + b'two\\n')\n"
        "    print('from python', file=sys.stderr)\n"
        "    os.write(2, b'E0000 real_error.cc:1] something else failed\\n')\n"
        "os.write(2, b'after\\n')\n"
        f"os.write(2, {NOISY!r}.splitlines(True)[1])\n"  # outside the block: not filtered
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        "before", "one", "two", "from python", "E0000 real_error.cc:1] something else failed", "after",
        NOISY.decode().splitlines()[1],
    ]


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia/version"), reason="a GPU driver: nothing is filtered")
def test_tensorflow_imports_quietly_without_a_gpu_driver():
    plain = _python("import tensorflow as tf; tf.config.list_physical_devices('GPU')")
    quiet = _python("from dualml.quiet_tf import import_tensorflow; tf = import_tensorflow();"
                    "import sys; print('devices', tf.config.list_physical_devices(), file=sys.stderr)")
    assert plain.returncode == 0 and quiet.returncode == 0, quiet.stderr
    # The anchor: this TensorFlow does print the probe lines here (else the test proves nothing).
    assert b"failed call to cuInit" in plain.stderr or b"Could not find cuda drivers" in plain.stderr
    assert b"cuInit" not in quiet.stderr and b"cuda drivers" not in quiet.stderr, quiet.stderr.decode()
    assert b"devices [PhysicalDevice(name='/physical_device:CPU:0'" in quiet.stderr
