"""The gRPC API: `jaxinfer.proto` and the modules `make proto` generates from it (checked in)."""
