"""The public gRPC gateway: validates, authenticates and turns `vlm.v1` calls into Triton ensemble calls."""
