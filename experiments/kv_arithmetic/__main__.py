"""python -m experiments.kv_arithmetic --config experiments/kv_arithmetic/configs/kv_quick.yaml"""

import sys

from experiments.kv_arithmetic.run import main

sys.exit(main())
