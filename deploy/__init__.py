"""Ray Serve application: ingress, LLM server deployment, gRPC servicer, serve configs."""
