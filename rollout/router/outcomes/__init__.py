"""Outcomes: the prediction log (what each version said about each request), its durable marks, the label join
(labels posted by the label sources, counted as outcome and paired metrics) and their settings.

Must not: import the router's request path beyond what it is handed, the controller, or model code.
"""
