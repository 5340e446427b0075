"""``python -m rollout.dashboard``: the embedded dashboard (``fraudwatch-dashboard``)."""

from rollout.dashboard.app import main

main()
