"""``python -m dualml.serving``: start the prediction server (see dualml.serving.server)."""

from dualml.quiet_tf import import_tensorflow
from dualml.serving.server import main

import_tensorflow()  # the model needs it; imported here so a CPU-only host's CUDA probe stays out of the log
raise SystemExit(main())
