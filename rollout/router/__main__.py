"""``python -m rollout.router``: the router process (the chart's router container, ``fraudwatch-router``)."""

from rollout.router.app import main

main()
