"""``python -m distill_zoo.compression``: the command line of
:mod:`distill_zoo.shipping.compression`."""

from distill_zoo.shipping.compression import main

if __name__ == "__main__":
    raise SystemExit(main())
