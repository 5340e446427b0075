"""Plumbing every component shares: structured logs, the clock, atomic files, HTTP helpers (the one error-response
builder, bearer checks, bounded body reads) and child processes (free ports, process-tree stop, waiting).

Must not: import any other fraudwatch package: everything may import it.
"""
