"""``python -m rollout.controller``: the rollout controller process (the chart's controller container)."""

from rollout.controller.loop import main

raise SystemExit(main())
