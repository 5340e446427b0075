"""The rollout demo (``fraudwatch-demo``, ``make demo``): its settings, policy (+ ``demo_policy.yaml``), the stack of
child processes, the live view and the timeline report.

Must not: import model code (the model half runs as a subprocess, ``fraudwatch demo-versions``, and hands over JSON);
nothing in the product imports it.
"""
