import sys

from finetune_devenv.nodeagent.cli import main

sys.exit(main())
