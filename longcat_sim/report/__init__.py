"""Report building: simulations and run results gathered into the sections the page renders."""
