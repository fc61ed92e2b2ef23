"""Serving: PyTriton server, Triton client, model repositories for a stock Triton (above runtime/)."""
