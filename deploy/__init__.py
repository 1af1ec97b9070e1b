"""Ray Serve application: ingress, LLM server deployment, gRPC servicer, serve configs."""

from deploy.loopback import bind_loopback_if_asked

bind_loopback_if_asked()  # a Serve replica of a loopback cluster imports this before it opens its servers
