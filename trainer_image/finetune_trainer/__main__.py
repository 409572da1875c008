"""``python -m finetune_trainer``: see :mod:`finetune_trainer.cli`."""

import sys

from finetune_trainer.cli import main

sys.exit(main())
