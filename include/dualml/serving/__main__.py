"""``python -m dualml.serving``: start the prediction server (see dualml.serving.server)."""

from dualml.serving.server import main

raise SystemExit(main())
