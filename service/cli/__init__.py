"""``fraudwatch``: the model side's command line (data, training, registry aliases, scoring, retraining, the demos).

Must not: hold logic its commands call (each command calls one package's function); nothing in the product imports
it.
"""
