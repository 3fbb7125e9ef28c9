"""Model surgery on traced graphs: ``cut`` (run a model from named values to named values)."""
