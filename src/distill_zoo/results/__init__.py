"""What runs leave behind, read back: run folders, the sweep report, its plots."""
