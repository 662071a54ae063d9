import sys

from training.recipes import main

sys.exit(main())
