"""``python -m dualml.serving``: start the prediction server (see dualml.serving.app)."""

from dualml.serving.app import main

raise SystemExit(main())
