"""Launch detection, process groups, collectives, hardware checks and the order models are parallelized in."""
