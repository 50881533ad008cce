"""The KEDA external scaler: a gRPC front process (front, board, servicer, server) that KEDA
calls, and the bridge by which the engine's process supplies it (bridge, messages)."""
