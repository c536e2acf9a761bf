"""An example robust-train plugin; the parts live in `robust_train_example.parts` (the entry point)."""
