import sys

from experiments.language.run import main

sys.exit(main())
