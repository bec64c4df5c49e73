"""How training runs fast and in parallel: speed switches and DDP collectives."""
