"""``python -m finetune_operator.cli``: the same as the ``ftjob`` console script."""

import sys

from finetune_operator.cli import main

sys.exit(main())
