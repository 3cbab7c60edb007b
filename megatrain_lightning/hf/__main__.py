import sys

from megatrain_lightning.hf.cli import main

sys.exit(main())
