import sys

from tta_runtime.cli.main import main

sys.exit(main())
