"""Plumbing every component shares: structured logs, the clock, atomic files, HTTP helpers (bearer checks, bounded
body reads) and child processes (free ports, process-tree stop).

Must not: import any other fraudwatch package: everything may import it.
"""
