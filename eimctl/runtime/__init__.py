"""Runtime services every step uses: errors, atomic writes, progress, device, run directory, fault hooks."""
