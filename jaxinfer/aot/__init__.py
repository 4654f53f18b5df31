"""`python -m jaxinfer.aot`: the ahead-of-time compile and memory-planning front end (see `__main__`).
The machinery it drives is `jaxinfer.compilation`."""
