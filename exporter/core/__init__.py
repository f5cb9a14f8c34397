"""The facts everything builds on: monitor events, endpoints, the metrics table and the pure
reducer.

Imports nothing else of the package."""
