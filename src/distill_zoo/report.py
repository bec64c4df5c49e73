"""``python -m distill_zoo.report``: the command line of :mod:`distill_zoo.results.report`."""

from distill_zoo.results.report import main

if __name__ == "__main__":
    raise SystemExit(main())
