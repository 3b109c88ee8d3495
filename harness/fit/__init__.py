"""The fit probe (harness fit-probe): cells, search, store, reports, and the memory model it calibrates."""
