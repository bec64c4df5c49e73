"""Multi-stage work: a runner for lists of ordinary runs and the recipes that write them."""
