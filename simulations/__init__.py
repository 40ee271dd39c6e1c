"""Research simulations: partitioners, baselines, sweeps, tables and plots."""
