"""The OTLP output: requests built from the rendered rows, pushed by the official exporters."""
