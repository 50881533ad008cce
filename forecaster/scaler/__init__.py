"""The KEDA external scaler: the gRPC servicer and server over the engine."""
