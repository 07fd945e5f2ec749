"""The Ray adapter: the only package that imports Ray (connect, cluster checks, Ray Data pipeline, TorchTrainer fit, prepare)."""
