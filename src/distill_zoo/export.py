"""``python -m distill_zoo.export``: the command line of :mod:`distill_zoo.shipping.export`."""

from distill_zoo.shipping.export import main

if __name__ == "__main__":
    raise SystemExit(main())
