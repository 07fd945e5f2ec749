"""Using a trained model: load_model (run dir or checkpoint) and sampling."""
