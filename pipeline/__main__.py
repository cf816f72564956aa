"""``python -m wildreid``: what torchrun starts on every rank (``torchrun ... -m wildreid train ...``)."""

from wildreid.cli import main

main()
