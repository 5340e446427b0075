"""``rolloutctl`` / ``kubectl-modelrollout``: the commands (:mod:`~rollout.cli.main`), where they read and send
(:mod:`~rollout.cli.clients`: the local state directory or the ModelRollout), what they show (:mod:`~rollout.cli.views`)
and their exit codes (:mod:`~rollout.cli.errors`).

Must not: import the controller loop or the router (it talks to them through their stores and endpoints), or model
code; nothing in the product imports it.
"""
