import sys

from latentformer.cli import main

sys.exit(main())
