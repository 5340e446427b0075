"""The rollout's pure core: the vocabulary (stages, roles, phases), the policy as data (+ ``default_policy.yaml``),
the stage machine, gate analysis and the statistics behind it (sequential tests, confidence sequences, drift maths),
the routing decision, the controller's state and commands as data.

Must not: do I/O (no network, processes or files but the packaged policy) or import anything else of fraudwatch:
every other package builds on this one (contract ``core-is-pure`` in .importlinter).
"""
