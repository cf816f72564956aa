"""wildreid.core: what every other package builds on and nothing of wildreid's own below it.

The errors and their exit codes (``errors``), graceful stops and the fault-injection point (``signals``),
sizes on the command line (``units``) and the atomic, fsynced write (``durable``). ``wildreid.shards`` and
``wildreid.stores`` import from here, never from the pipeline package above them.
"""
