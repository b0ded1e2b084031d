"""The local stack and the sample-data generator: production code never imports this package."""
