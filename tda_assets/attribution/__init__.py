"""The attribution engine, plain Python (torch, diffusers; no Dagster): the method of DESIGN §1."""
