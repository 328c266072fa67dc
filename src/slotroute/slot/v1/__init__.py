"""Generated protobuf and gRPC modules; run `make proto` to regenerate."""
