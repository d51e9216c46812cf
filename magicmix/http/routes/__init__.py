"""One router per concern; `http.app` mounts them."""
