import sys

from dualml.trainer.task import main

sys.exit(main())
