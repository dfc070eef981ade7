"""Pipeline stages. Each module has a pure `run()` and a thin `main()` that dvc.yaml calls."""

import os
import sys

if os.environ.get("TUNEGATE_WARM") and sys.argv[:1] == ["-m"]:  # `python -m stages.X` with a warm runner
    from tunegate.warm import hand_off

    hand_off()  # exits with the stage's status, or returns when the runner declines: the stage runs here
